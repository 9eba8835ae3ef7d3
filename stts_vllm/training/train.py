"""The training loop behind `stts-vllm train`.

Modes: `scratch` trains every weight of a checkpoint (e.g. a fresh tiny demo); `scorer` freezes
a base model and trains only the scorer; `scorer+llm` also trains the LLM. Each step packs
`batch_size` procedural samples into one sequence; keep ratios are drawn per sample from
`keep_ratios`, so the model learns to answer at every budget it will be served at. Progress
goes to a tqdm bar and a JSON-lines log; `resume` continues from the last saved state.

`explore` > 0 adds what the paper does not have: the learned scorer's kept sets are drawn
(`sample_retention`) and a REINFORCE term (`policy_weight`) rewards draws whose answer loss
beat the same item's loss under the top-k selection (one more forward pass), so the scorer
hears what dropping a unit cost; the key bias alone only reports what a kept unit's
neighbours read from it. `answer_loss_on` = `top_k` keeps the drawn sets out of the answer
loss: the model learns from the sets it serves with.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from stts_vllm.training.config import TrainConfig
from stts_vllm.training.model import Outputs, Prepared, STTSVideoQAModel
from stts_vllm.training.videoqa import TASKS, make_sample

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
# What a resumed run must share with the run that saved the state: the batches are drawn
# from (seed, step), and a resume that changed the mix, lr or warmup would train another
# recipe, silently. `steps` may grow (experiments/README.md's 1200 -> 2400 recipe): logged,
# since the cosine then spans the new length and the lr jumps back up.
RESUME_FIXED = (
    "mode", "steps", "batch_size", "lr", "scorer_lr", "warmup", "aux_weight", "keep_ratios",
    "frames", "tasks", "explore", "policy_weight", "answer_loss_on", "seed",
)  # fmt: skip


def fresh_demo(init: Path, seed: int, family: str, text_layers: int | None = None) -> Path:
    """The tiny demo a from-scratch run starts from (built once, reused by `--resume`), with
    a learned scorer; `text_layers` deepens its LLM (the serving demo's 2 layers cannot learn
    the time questions)."""
    from stts_vllm.demo import demo_geometry, make_demo
    from stts_vllm.families import family_named

    if not (init / "config.json").is_file():
        layers: dict[str, int] = {}
        if text_layers is not None:
            layers["num_hidden_layers"] = text_layers
            if "max_window_layers" in demo_geometry(family_named(family)).text:
                layers["max_window_layers"] = text_layers  # windowed LLMs (Qwen2.5-VL)
        make_demo(
            init, seed=seed, scorer="learned", overwrite=True, family=family, text_overrides=layers
        )
    return init


def _trainable(model: STTSVideoQAModel, mode: str) -> list[dict]:
    scorer = list(model.scorer.parameters()) if model.scorer is not None else []
    if mode == "scratch":
        base = list(model.hf.parameters())
    elif mode == "scorer+llm":
        base = list(model.hf.model.language_model.parameters()) + list(
            model.hf.lm_head.parameters()
        )
    else:
        base = []
    wanted = {id(p) for p in base + scorer}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    groups = [{"params": scorer, "name": "scorer"}]
    if base:
        groups.append({"params": base, "name": "base"})
    return groups


def lr_scale(step: int, warmup: int, steps: int) -> float:
    """The learning rate's share of its peak at `step`: linear warm-up, then a cosine down to
    a tenth at `steps` (both trainers)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _schedule(step: int, config: TrainConfig) -> float:
    return lr_scale(step, config.warmup, config.steps)


def _batch(
    model: STTSVideoQAModel, step: int, config: TrainConfig
) -> tuple[list[Prepared], list[float]]:
    """Deterministic in (seed, step): a resumed run sees the same samples."""
    rng = random.Random(config.seed * 1_000_003 + step)
    frames = rng.choice(config.frames)
    first = (config.seed * 10_000_000 + step * config.batch_size) % 9_000_000
    tasks = config.tasks
    items = [
        model.prepare(make_sample(first + i, "train", frames, tasks[(first + i) % len(tasks)]))
        for i in range(config.batch_size)
    ]
    keeps = [rng.choice(config.keep_ratios) for _ in items]
    return items, keeps


@torch.no_grad()
def evaluate(
    model: STTSVideoQAModel,
    split: str,
    count: int,
    keep_ratio: float,
    frames: int = 16,
    task: str | None = None,
) -> dict:
    """Accuracy of greedy first-token answers on `count` samples of `split` (of one `task`
    when named), and the correlation of learned scores with the temporal target on them."""
    model.eval()
    correct, scores, targets = 0, [], []
    for start in range(0, count, 16):
        batch = [
            model.prepare(make_sample(s, split, frames, task))
            for s in range(start, min(count, start + 16))
        ]
        out = model(batch, [keep_ratio] * len(batch))
        for item, logits in zip(batch, out.answer_logits, strict=True):
            correct += int(int(logits.argmax()) == item.answer[0])
        for s, t in zip(out.scores, out.targets, strict=True):
            if s is not None and t is not None and t.numel():
                scores.append(s[1:].flatten().float())
                targets.append(t.flatten().float())
    model.train()
    result = {
        "split": split,
        "keep_ratio": keep_ratio,
        "accuracy": correct / count,
        "samples": count,
    }
    if task is not None:
        result["task"] = task
    if scores:
        result["score_target_corr"] = pearson(torch.cat(scores), torch.cat(targets))
    return result


def policy_loss(
    log_probs: list[torch.Tensor | None], losses: torch.Tensor, baselines: torch.Tensor
) -> torch.Tensor | None:
    """REINFORCE on the explored draws: (loss - baseline) x log p(draw), averaged over the
    items that drew. The baseline is each item's own loss under the top-k selection (the
    self-critical baseline), so what a question costs anyway cancels and only what the draw
    changed is left. None: nothing drew."""
    terms = [
        (loss - base) * log_prob
        for log_prob, loss, base in zip(log_probs, losses.tolist(), baselines.tolist(), strict=True)
        if log_prob is not None
    ]
    return torch.stack(terms).mean() if terms else None


def _step_backward(
    model: STTSVideoQAModel, batch: list[Prepared], keeps: list[float], config: TrainConfig
) -> tuple[Outputs, float, float | None]:
    """One step's gradients, accumulated into the parameters' `.grad`: returns the outputs
    whose answer loss trains the model, the total loss, and the policy term when there is one.

    With a policy term, the pruned items (keep < 1.0) run twice: once with drawn kept sets
    and once with the top-k, whose per-item loss is the draw's baseline. `answer_loss_on`
    says which of the two carries the answer loss's gradient: `draws` (the whole batch is
    explored; the top-k pass needs no gradient) or `top_k` (the model learns from the sets it
    will serve with, and the draws act only through the policy term, whose gradient reaches
    the scorer and, in `scratch` mode, the ViT blocks under it). With
    `top_k` both passes need gradients, so the top-k loss is backpropagated before the draws
    run: the two graphs are never held at once, and peak memory stays that of one pass.
    Items at keep 1.0 draw nothing and run once; per-item losses do not depend on which
    items share a packed row.
    """
    if not config.policy_weight:
        output = model(batch, keeps, aux_weight=config.aux_weight, explore=config.explore)
        output.loss.backward()
        return output, float(output.loss.detach()), None
    pruned = [i for i, keep in enumerate(keeps) if keep < 1.0]
    subset = [batch[i] for i in pruned], [keeps[i] for i in pruned]
    policy = None
    if config.answer_loss_on == "draws":
        output = model(batch, keeps, aux_weight=config.aux_weight, explore=config.explore)
        loss = output.loss
        if pruned:
            with torch.no_grad():
                baselines = model(*subset, aux_weight=config.aux_weight).sample_losses
            drawn = [output.log_probs[i] for i in pruned]
            policy = policy_loss(drawn, output.sample_losses[pruned], baselines)
            if policy is not None:
                loss = loss + config.policy_weight * policy
        loss.backward()
    else:
        output = model(batch, keeps, aux_weight=config.aux_weight)
        output.loss.backward()
        loss = output.loss.detach()
        if pruned:
            # Gradients only through the draws' log-probabilities: their answer loss is a reward.
            explored = model(*subset, aux_weight=config.aux_weight, explore=config.explore)
            baselines = output.sample_losses[pruned]
            policy = policy_loss(explored.log_probs, explored.sample_losses, baselines)
            del explored
            if policy is not None:
                (config.policy_weight * policy).backward()
                loss = loss + config.policy_weight * policy.detach()
    return output, float(loss.detach()), None if policy is None else float(policy.detach())


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = (a.norm() * b.norm()).clamp_min(1e-12)
    return float((a * b).sum() / denom)


def train(config: TrainConfig) -> Path:
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "last" / STATE_FILE
    source = Path(config.init)
    if config.resume and state_path.is_file():
        source = out / "last"
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r}: this torch build sees no CUDA device")
    model = STTSVideoQAModel.from_checkpoint(source, scorer="learned").to(device)
    model.autocast_dtype = None if config.dtype == "float32" else getattr(torch, config.dtype)
    model.train()
    groups = _trainable(model, config.mode)
    for group in groups:
        group["lr"] = config.scorer_lr if group["name"] == "scorer" else config.lr
        group["base_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    start, stopped, streak = 0, None, 0
    if source != Path(config.init):
        # On the CPU first: the optimizer's state follows its parameters' device when loaded.
        state = torch.load(state_path, weights_only=False, map_location="cpu")
        stopped, streak = state.get("stopped"), state.get("streak", 0)
        if stopped is None:  # a stage `until` ended trains nothing more, whatever the flags
            _check_resumable(state.get("config"), config, state_path)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        logger.info("resumed from %s at step %d", source, start)
        saved_steps = (state.get("config") or {}).get("steps", config.steps)
        if stopped is None and saved_steps != config.steps:
            logger.warning(
                "resumed with --steps %d (saved run: %d): the cosine now spans %d steps, so "
                "the lr goes from %.2f to %.2f of its peak at step %d",
                config.steps, saved_steps, config.steps,
                _schedule(start - 1, replace(config, steps=saved_steps)),
                _schedule(start, config), start + 1,
            )  # fmt: skip
    if config.resume:  # what a killed run logged after its last save (all, if none) goes
        drop_records_after(out / LOG_FILE, start)
    if stopped is not None:  # `until` was met: the stage is done, whatever `steps` says
        start = config.steps
    log = (out / LOG_FILE).open("a")
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train")
    window: list[dict] = []
    learned = False
    for step in bar:
        t0 = time.perf_counter()
        batch, keeps = _batch(model, step, config)
        t1 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _schedule(step, config)
        optimizer.zero_grad(set_to_none=True)
        output, loss, policy = _step_backward(model, batch, keeps, config)
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        record = {
            "step": step + 1,
            "loss": loss,
            "lm_loss": float(output.lm_loss),
            "temporal_loss": float(output.temporal_loss),
            "data_seconds": t1 - t0,
            "step_seconds": time.perf_counter() - t1,
            "video_tokens": sum(output.video_tokens),
        }
        if policy is not None:
            record["policy_loss"] = policy
        window.append(record)
        window = window[-50:]
        bar.set_postfix(
            lm=f"{sum(r['lm_loss'] for r in window) / len(window):.3f}",
            aux=f"{sum(r['temporal_loss'] for r in window) / len(window):.4f}",
        )
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            for keep in (1.0, 0.5):
                record[f"val_acc@{keep}"] = evaluate(model, "val", config.eval_samples, keep)[
                    "accuracy"
                ]
            # A curriculum stage's breakthrough on its own task(s) hides in the mixed split's
            # accuracy (one question in seven), so a non-default mix also reports each task.
            per_task = dict.fromkeys(config.tasks if config.tasks != TASKS else ())
            for task in per_task | dict.fromkeys(config.until):
                record[f"val_acc@1.0/{task}"] = evaluate(
                    model, "val", config.eval_samples, 1.0, task=task
                )["accuracy"]
            met = bool(config.until) and all(
                record[f"val_acc@1.0/{task}"] >= least for task, least in config.until.items()
            )
            streak = streak + 1 if met else 0
            learned = streak >= config.until_evals
            if config.until:
                record["until_streak"] = streak
            bar.write(
                json.dumps({k: v for k, v in record.items() if "val" in k} | {"step": step + 1})
            )
        if learned:
            record["until_met"] = True
            stopped = step + 1
        log.write(json.dumps(record) + "\n")
        log.flush()
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps or learned:
            _save_state(model, optimizer, step + 1, out / "last", config, stopped, streak)
        if learned:
            logger.info("stopping at step %d: %s reached", stopped, config.until)
            break
    log.close()
    final = write_dir_atomically(out / "checkpoint", lambda tmp: model.save(tmp, Path(config.init)))
    (out / "train_config.json").write_text(
        json.dumps(asdict(config) | {"history": [], "stopped": stopped}, default=str, indent=2)
    )
    return final


def write_dir_atomically(where: Path, write: Callable[[Path], object]) -> Path:
    """Write a directory under a temporary name, then rename it into place: a reader that
    checks for `where` (a stage script, `quality` reusing a seed) never sees half of it, and
    a crash mid-write leaves the previous `where` whole."""
    tmp = where.with_name(where.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if where.exists():
        shutil.rmtree(where)
    tmp.rename(where)
    return where


def _save_state(
    model: STTSVideoQAModel,
    optimizer,
    step: int,
    where: Path,
    config: TrainConfig,
    stopped: int | None,
    streak: int,
) -> None:
    """`stopped` is the step where `until` was met (None: not met), so a resumed run that had
    stopped early ends at once instead of training on to `steps`; `streak` counts the
    evaluations in a row that met it so far, so a resume keeps counting; `config` holds the
    `RESUME_FIXED` fields a resume is checked against."""

    def write(tmp: Path) -> None:
        model.save(tmp, Path(config.init))
        state = {"optimizer": optimizer.state_dict(), "step": step, "rng": torch.get_rng_state()}
        device = torch.device(config.device)
        # Nothing draws from the CUDA generator today (the explored draws use the CPU's); it
        # is saved and restored so that whatever does later resumes exactly.
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        state |= {"stopped": stopped, "streak": streak, "config": _resume_fields(config)}
        torch.save(state, tmp / STATE_FILE)

    write_dir_atomically(where, write)


def _resume_fields(config: TrainConfig) -> dict:
    fields = asdict(config)
    return {name: json.loads(json.dumps(fields[name])) for name in RESUME_FIXED}


def _check_resumable(saved: dict | None, config: TrainConfig, state_path: Path) -> None:
    """Refuse a resume whose schedule or data differ from the saved run's (states saved
    before the check existed carry no config and are resumed as before)."""
    if saved is None:
        return
    now = _resume_fields(config)
    # Only the fields the state has: one added to RESUME_FIXED later does not refuse old states.
    changed = {k: (saved[k], now[k]) for k in RESUME_FIXED if k in saved and saved[k] != now[k]}
    if "steps" in changed and config.steps > changed["steps"][0]:
        del changed["steps"]  # longer is allowed (and logged); shorter cuts the schedule
    if changed:
        diff = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in changed.items())
        raise ValueError(
            f"cannot resume {state_path.parent}: {diff}. Resume with the saved run's settings, "
            "or start a new run from its weights (--init OUT/last or OUT/checkpoint)"
        )


def drop_records_after(log_path: Path, step: int) -> None:
    """A run killed after its last save logged steps the resume trains again: drop them (and
    a line the kill cut off), so the log holds each step once."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = log_path.with_name(log_path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(log_path)  # a kill mid-write leaves the old log whole
