"""Training: the HF model's pruned tower is the stock tower at keep 1.0, a few steps lower the
loss, state resumes, and the output is an STTS checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import stts_vllm.training.train as train_module
from stts_vllm.checkpoint import SCORER_FILE, STTS_ARCHITECTURE, read_config
from stts_vllm.cli import Train
from stts_vllm.core import retention_mask, sample_retention
from stts_vllm.demo import make_demo
from stts_vllm.training.hf_vision import pruned_vision_forward
from stts_vllm.training.model import STTSVideoQAModel
from stts_vllm.training.train import (
    TrainConfig,
    _batch,
    _step_backward,
    policy_loss,
    train,
    write_dir_atomically,
)
from stts_vllm.training.videoqa import TASKS, make_sample
from tests.training.helpers import SMOKE, read_log


def test_pruned_tower_at_keep_one_is_the_stock_tower(tmp_path: Path) -> None:
    model = STTSVideoQAModel.from_checkpoint(make_demo(tmp_path / "m", scorer="learned"))
    item = model.prepare(make_sample(4, "train"))
    visual = model.hf.model.visual
    with torch.no_grad():
        stock = visual(item.pixel_values, torch.tensor([item.grid])).pooler_output
        ours = pruned_vision_forward(
            visual, item.pixel_values, [item.grid], [1.0], config=model.stts, scorer=model.scorer
        )
    assert ours.keep_masks == [None]
    torch.testing.assert_close(ours.embeds[0], stock, atol=1e-4, rtol=1e-4)


def test_pruned_batch_keeps_the_count_and_gradients_reach_the_scorer(tmp_path: Path) -> None:
    model = STTSVideoQAModel.from_checkpoint(make_demo(tmp_path / "m", scorer="learned"))
    batch = [model.prepare(make_sample(i, "train")) for i in range(3)]
    out = model(batch, [0.5, 1.0, 0.3])
    assert out.video_tokens == [144, 288, 86]  # 8 steps x 36 units: round-half-up of k*288
    out.loss.backward()
    scorer_grads = [p.grad for p in model.scorer.parameters()]
    # The MLP's last layer gets gradient from both the aux loss and the key bias.
    assert all(g is not None and torch.isfinite(g).all() for g in scorer_grads)
    assert float(out.temporal_loss) > 0


def test_a_few_steps_lower_the_loss_and_write_a_servable_checkpoint(smoke_run: Path) -> None:
    log = read_log(smoke_run)
    assert [r["step"] for r in log] == list(range(1, SMOKE["steps"] + 1))
    first, last = log[0]["lm_loss"], min(r["lm_loss"] for r in log[-3:])
    assert last < first - 0.5, (first, last)
    assert all(r["temporal_loss"] >= 0 for r in log)
    assert "val_acc@0.5" in log[-1]
    checkpoint = smoke_run / "checkpoint"
    config = read_config(checkpoint)
    assert config["architectures"] == [STTS_ARCHITECTURE] and config["stts"]["scorer"] == "learned"
    assert (checkpoint / SCORER_FILE).is_file() and (checkpoint / "tokenizer.json").is_file()
    assert not (smoke_run / "checkpoint.tmp").exists() and not (smoke_run / "last.tmp").exists()


def test_a_checkpoint_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """Stage scripts and `quality` reuse a run once `checkpoint/config.json` exists: a write
    that fails half-way must leave neither a partial directory nor a damaged earlier one."""
    where = tmp_path / "checkpoint"

    def write(files: dict[str, str]):
        def go(tmp: Path) -> None:
            tmp.mkdir()
            for name, text in files.items():
                (tmp / name).write_text(text)
                assert where.exists() is (where / "old").exists()  # nothing in place yet

        return go

    def crash(tmp: Path) -> None:
        write({"config.json": "{}"})(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir_atomically(where, crash)
    assert not where.exists() and not (tmp_path / "checkpoint.tmp").exists()
    write_dir_atomically(where, write({"old": "1", "config.json": "{}"}))
    with pytest.raises(OSError):
        write_dir_atomically(where, crash)
    assert sorted(p.name for p in where.iterdir()) == ["config.json", "old"]
    write_dir_atomically(where, write({"config.json": '{"new": 1}'}))
    assert [p.name for p in where.iterdir()] == ["config.json"]


class _Killed(Exception):
    """Stands for a run killed mid-stage (Ctrl-C, a lost machine)."""


def _kill_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The next `train` dies as it starts `step` (0-based), after logging the steps before."""
    real = train_module._batch

    def batch(model, at: int, config):
        if at == step:
            raise _Killed
        return real(model, at, config)

    monkeypatch.setattr(train_module, "_batch", batch)


def test_resume_continues_where_it_stopped(
    smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed in step 7 (saved at step 4, logged to 6) resumes at step 5, and the log
    holds each step once."""
    init = smoke_run.parent / "init"
    out = tmp_path / "killed"
    config = TrainConfig(init=init, out=out, frames=(16,), **SMOKE)
    _kill_at(monkeypatch, 6)
    with pytest.raises(_Killed):
        train(config)
    monkeypatch.undo()
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5, 6]
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=False)["step"] == 4
    train(TrainConfig(**asdict(config) | {"resume": True}))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_resume_with_more_steps_goes_on_and_says_where_the_lr_jumps(
    smoke_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An 8-step run resumed as a 10-step one (experiments/README.md's 1200 -> 2400 recipe)
    trains steps 9 and 10 once each; the log says the cosine now spans 10 steps."""
    import shutil

    out = tmp_path / "longer"
    shutil.copytree(smoke_run / "last", out / "last")
    shutil.copyfile(smoke_run / "train_log.jsonl", out / "train_log.jsonl")
    init = smoke_run.parent / "init"
    with caplog.at_level("WARNING", logger="stts_vllm.training.train"):
        train(TrainConfig(init=init, out=out, resume=True, frames=(16,), **SMOKE | {"steps": 10}))
    assert [r["step"] for r in read_log(out)] == list(range(1, 11))
    assert "resumed with --steps 10 (saved run: 8): the cosine now spans 10 steps" in caplog.text


def test_resume_before_the_first_save_starts_over_with_a_clean_log(
    smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed in step 3 with nothing saved yet (and a line cut off by the kill): the resume
    starts from the init, and the log holds steps 1-8 once each."""
    out = tmp_path / "early"
    config = TrainConfig(init=smoke_run.parent / "init", out=out, frames=(16,), **SMOKE)
    _kill_at(monkeypatch, 2)
    with pytest.raises(_Killed):
        train(config)
    monkeypatch.undo()
    assert not (out / "last").exists()
    with (out / "train_log.jsonl").open("a") as log:
        log.write('{"step": 3, "lm_lo')
    train(TrainConfig(**asdict(config) | {"resume": True}))
    assert [r["step"] for r in read_log(out)] == list(range(1, 9))


def test_resume_of_a_state_saved_before_the_check_goes_on(smoke_run: Path, tmp_path: Path) -> None:
    """A state without the saved settings (older runs) resumes as before, settings unchecked."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(smoke_run / "last", out / "last")
    state = torch.load(out / "last" / "trainer_state.pt", weights_only=False)
    del state["config"]
    torch.save(state, out / "last" / "trainer_state.pt")
    init = smoke_run.parent / "init"
    train(TrainConfig(init=init, out=out, resume=True, frames=(16,), **SMOKE | {"lr": 3e-4}))
    assert (out / "checkpoint" / "config.json").is_file()


@pytest.mark.parametrize(
    "change", [{"steps": 6}, {"lr": 3e-4}, {"tasks": ("changed",)}, {"seed": 1}]
)
def test_resume_refuses_another_schedule_or_data(
    smoke_run: Path, tmp_path: Path, change: dict
) -> None:
    """Another lr or mix would train another recipe, another seed another stream of batches,
    fewer steps another schedule: refused, naming the field, before any step."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(smoke_run / "last", out / "last")
    config = TrainConfig(init=smoke_run.parent / "init", out=out, frames=(16,), **SMOKE)
    only = rf"cannot resume \S+: {next(iter(change))}: saved [^:]*, now [^:]*\. Resume"
    with pytest.raises(ValueError, match=only):
        train(TrainConfig(**asdict(config) | change | {"resume": True}))
    assert not (out / "train_log.jsonl").exists()  # refused before the log was opened


def test_scorer_mode_trains_only_the_scorer_of_a_frozen_base(
    smoke_run: Path, tmp_path: Path
) -> None:
    """`train --init CKPT --mode scorer`: the recipe for a converted real checkpoint. The
    base's weights come out bit-identical, the scorer's move, and the result is an STTS
    checkpoint with the learned scorer."""
    from safetensors.torch import load_file

    base = smoke_run / "checkpoint"
    out = tmp_path / "scorer-only"
    steps = SMOKE | {"steps": 3, "eval_every": 3, "save_every": 3}
    trained = train(TrainConfig(init=base, out=out, mode="scorer", frames=(16,), **steps))

    def weights(ckpt: Path, prefix: str = "") -> dict:
        files = sorted(ckpt.glob("model*.safetensors"))
        return {k: v for f in files for k, v in load_file(str(f)).items() if k.startswith(prefix)}

    before, after = weights(base), weights(trained)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    scorer_before = load_file(str(base / SCORER_FILE))
    scorer_after = load_file(str(trained / SCORER_FILE))
    assert any(not torch.equal(scorer_before[k], scorer_after[k]) for k in scorer_before)
    assert read_config(trained)["stts"]["scorer"] == "learned"


class _Pixels:
    """`_batch` only asks the model to prepare each sample; keep the samples as they are."""

    def prepare(self, sample):
        return sample


def test_the_default_training_mix_is_the_task_cycle_and_tasks_reweights_it() -> None:
    config = TrainConfig(init=Path("i"), out=Path("o"), batch_size=14)
    items, _ = _batch(_Pixels(), 5, config)
    first = items[0].seed
    # the default samples are the ones a run drew before the mix existed
    before = [make_sample(first + i, "train", len(items[0].frames)) for i in range(14)]
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(items, before, strict=True))
    assert [s.question for s in items] == [s.question for s in before]
    assert [s.task for s in items] == [TASKS[(first + i) % len(TASKS)] for i in range(14)]

    mix = TrainConfig(
        init=Path("i"), out=Path("o"), batch_size=12, tasks=("direction", "changed", "direction")
    )
    tasks = [s.task for s in _batch(_Pixels(), 5, mix)[0]]
    assert tasks.count("direction") == 8 and tasks.count("changed") == 4


def test_a_curriculum_mix_reports_validation_accuracy_per_task(
    smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage that trains on a few tasks logs each one's keep-1.0 accuracy on its own
    questions; the default mix logs only the mixed split's."""
    import stts_vllm.training.train as train_module

    asked: list[tuple[str, str | None]] = []

    def recording(seed: int, split: str = "train", frames: int = 16, task: str | None = None):
        asked.append((split, task))
        return make_sample(seed, split, frames, task)

    monkeypatch.setattr(train_module, "make_sample", recording)
    out = tmp_path / "stage"
    steps = SMOKE | {"steps": 1, "batch_size": 2, "eval_every": 1, "eval_samples": 3}
    config = TrainConfig(
        init=smoke_run / "checkpoint",
        out=out,
        frames=(16,),
        tasks=("count", "direction", "count"),
        keep_ratios=(1.0,),
        **steps,
    )
    train(config)
    record = read_log(out)[-1]
    per_task = {k: v for k, v in record.items() if k.startswith("val_acc@1.0/")}
    assert sorted(per_task) == ["val_acc@1.0/count", "val_acc@1.0/direction"]
    assert all(v in (0, 1 / 3, 2 / 3, 1) for v in per_task.values())
    val_tasks = [task for split, task in asked if split == "val"]
    assert val_tasks.count("count") == 3 and val_tasks.count("direction") == 3
    assert val_tasks.count(None) == 6  # the mixed split at keep 1.0 and 0.5, as before
    assert not any("/" in k for k in read_log(smoke_run)[-1])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_batched_vision_blocks_are_transformers_blocks(tmp_path: Path, family: str) -> None:
    """Training runs the tower's blocks itself (windows batched by length, the patch
    embedding as a matmul); pruned to mixed window lengths, it gives transformers' own
    modules' embeddings and the scorer's gradient. (Not sample 3: on its flat background the
    fresh scorer's scores tie at 0.5001, and float noise of 1e-7 flips which units are kept.)"""
    ckpt = make_demo(tmp_path / "m", scorer="learned", family=family)
    model = STTSVideoQAModel.from_checkpoint(ckpt)
    items = [model.prepare(make_sample(s, "train")) for s in (4, 5)]
    visual = model.hf.model.visual
    pixels = torch.cat([item.pixel_values for item in items])
    results = []
    for stock in (True, False):
        model.scorer.zero_grad()
        out = pruned_vision_forward(
            visual,
            pixels,
            [item.grid for item in items],
            [0.5, 0.3],
            config=model.stts,
            scorer=model.scorer,
            stock_blocks=stock,
        )
        torch.cat(out.embeds).square().sum().backward()
        grads = [p.grad.clone() for p in model.scorer.parameters()]
        results.append((out.embeds, out.keep_masks, grads))
    (stock_embeds, stock_masks, stock_grads), (embeds, masks, grads) = results
    assert all(torch.equal(a, b) for a, b in zip(stock_masks, masks, strict=True))
    for a, b in zip(stock_embeds, embeds, strict=True):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm())
    # Relative to the largest gradient: the score head's bias is a shift every key of a window
    # shares, so softmax cancels it and its gradient (norm ~1e-4, against ~1e4) is float noise.
    largest = max(float(g.norm()) for g in stock_grads)
    assert largest > 1
    for a, b in zip(stock_grads, grads, strict=True):
        assert float((a - b).norm()) <= 1e-4 * largest


def test_until_stops_a_stage_once_its_task_is_learned_and_a_resume_keeps_it_stopped(
    smoke_run: Path, tmp_path: Path
) -> None:
    """`until`: a bar any accuracy reaches stops the run at the first evaluation (step 2 of
    6), with a whole checkpoint, the task's accuracy logged although it is not in the mix,
    and the stop recorded; resuming the stopped run trains nothing more. A bar of 1.0 on
    tasks the 8-step model cannot answer all of runs to `steps`."""
    out = tmp_path / "until"
    steps = SMOKE | {"steps": 6, "batch_size": 2, "eval_every": 2, "eval_samples": 3}
    stage = dict(init=smoke_run / "checkpoint", out=out, frames=(16,), **steps)
    train(TrainConfig(**stage, until={"changed": 0.0}))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2]
    assert log[-1]["until_met"] is True and "val_acc@1.0/changed" in log[-1]
    assert (out / "checkpoint" / "config.json").is_file()
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["stopped"] == 2 and saved["until"] == {"changed": 0.0}
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=False)["stopped"] == 2

    train(TrainConfig(**stage, until={"changed": 0.0}, resume=True))
    assert [r["step"] for r in read_log(out)] == [1, 2]
    assert json.loads((out / "train_config.json").read_text())["stopped"] == 2

    out = tmp_path / "runs-on"
    stage["out"] = out
    train(TrainConfig(**stage, until={"color": 1.0, "count": 1.0, "changed": 1.0}))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert not any(r.get("until_met") for r in log)
    assert json.loads((out / "train_config.json").read_text())["stopped"] is None


def test_until_evals_needs_the_bar_held_at_that_many_evaluations_in_a_row(
    smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`until_evals=2`: a bar every evaluation meets stops the run at the second one (step 4
    of 8, not 2); a run with `until_evals=3` killed in step 3 (one met evaluation, saved with
    the state at step 2) keeps its count when resumed and stops at its third, step 6."""
    steps = SMOKE | {"steps": 8, "batch_size": 2, "eval_every": 2, "eval_samples": 3}
    stage = dict(init=smoke_run / "checkpoint", frames=(16,), until={"changed": 0.0}, **steps)
    out = tmp_path / "twice"
    train(TrainConfig(**stage, out=out, until_evals=2))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r.get("until_streak") for r in log] == [None, 1, None, 2]
    assert json.loads((out / "train_config.json").read_text())["stopped"] == 4

    out = tmp_path / "resumed"
    stage["save_every"] = 2
    _kill_at(monkeypatch, 2)
    with pytest.raises(_Killed):
        train(TrainConfig(**stage, out=out, until_evals=3))  # 1 of 3 met, saved at step 2
    monkeypatch.undo()
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=False)["streak"] == 1
    train(TrainConfig(**stage, out=out, until_evals=3, resume=True))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5, 6]
    assert read_log(out)[-1]["until_streak"] == 3


@pytest.mark.parametrize("until", [{"colour": 0.5}, {"changed": 1.5}, {"changed": -0.1}])
def test_until_refuses_unknown_tasks_and_bars_outside_0_1(until: dict) -> None:
    with pytest.raises(ValueError, match="until"):
        TrainConfig(init=Path("i"), out=Path("o"), until=until)


def test_until_evals_refuses_less_than_one() -> None:
    with pytest.raises(ValueError, match="until_evals"):
        TrainConfig(init=Path("i"), out=Path("o"), until={"changed": 0.5}, until_evals=0)


def test_until_evals_without_until_is_refused(tmp_path: Path) -> None:
    """More than one evaluation in a row with no bars to hold would run to `steps` silently;
    the CLI's model refuses it before `cli_cmd` builds a fresh demo under OUT."""
    with pytest.raises(ValueError, match="needs until"):
        TrainConfig(init=Path("i"), out=Path("o"), until_evals=2)
    TrainConfig(init=Path("i"), out=Path("o"), until_evals=1)  # the default stays accepted
    with pytest.raises(ValidationError, match="needs --until"):
        Train(out=tmp_path / "run", until_evals=2)
    Train(out=tmp_path / "run", until={"changed": 0.8}, until_evals=2)


def test_a_mix_and_until_may_name_a_warmup() -> None:
    config = TrainConfig(
        init=Path("i"),
        out=Path("o"),
        batch_size=4,
        tasks=("changed-flicker", "changed"),
        until={"changed-flicker": 0.8},
    )
    assert [s.task for s in _batch(_Pixels(), 0, config)[0]].count("changed-flicker") == 2


def test_an_unknown_or_empty_mix_is_refused() -> None:
    with pytest.raises(ValueError, match="tasks"):
        TrainConfig(init=Path("i"), out=Path("o"), tasks=("colour",))
    with pytest.raises(ValueError, match="tasks"):
        TrainConfig(init=Path("i"), out=Path("o"), tasks=())


def test_the_policy_term_teaches_the_scorer_to_keep_what_the_answer_needs() -> None:
    """REINFORCE on explored draws, alone: a loss that is low only when unit 5 of step 1 is
    kept moves that unit from the bottom of the ranking into the top-k (the key bias could
    never report this: a dropped unit leaves no trace in the loss)."""
    torch.manual_seed(0)
    raw = torch.full((3, 8), 1.0)
    raw[1, 5] = -1.0  # the unit the answer needs starts last
    logits = torch.nn.Parameter(raw)
    optimizer = torch.optim.SGD([logits], lr=4.0)
    assert not retention_mask(torch.sigmoid(logits).detach(), 12 / 24)[1, 5]
    for _ in range(200):  # across seeds it ranks in the top-k after 15-41 steps
        scores = torch.sigmoid(logits)
        mask, log_prob = sample_retention(scores, 12 / 24)
        top_k = retention_mask(scores.detach(), 12 / 24)
        loss, baseline = (torch.tensor([0.0 if m[1, 5] else 1.0]) for m in (mask, top_k))
        term = policy_loss([log_prob], loss, baseline)
        assert term is not None
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
    assert retention_mask(torch.sigmoid(logits).detach(), 12 / 24)[1, 5]


def test_explored_forward_keeps_the_counts_and_returns_differentiable_draws(
    tmp_path: Path,
) -> None:
    model = STTSVideoQAModel.from_checkpoint(make_demo(tmp_path / "m", scorer="learned"))
    batch = [model.prepare(make_sample(i, "train")) for i in range(3)]
    out = model(batch, [0.5, 1.0, 0.3], explore=1.0)
    assert out.video_tokens == [144, 288, 86]
    assert out.log_probs[1] is None and out.sample_losses.shape == (3,)
    term = policy_loss(out.log_probs, out.sample_losses + 1.0, out.sample_losses)
    term.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.scorer.parameters())
    top_k = model(batch, [0.5, 1.0, 0.3])
    assert top_k.log_probs == [None, None, None]


def test_the_policy_term_needs_exploration() -> None:
    with pytest.raises(ValueError, match="explore"):
        TrainConfig(init=Path("i"), out=Path("o"), policy_weight=1.0)
    with pytest.raises(ValueError, match="policy_weight"):
        TrainConfig(init=Path("i"), out=Path("o"), explore=1.0, answer_loss_on="top_k")


def _policy_config(answer_loss_on: str) -> TrainConfig:
    return TrainConfig(
        init=Path("i"), out=Path("o"), explore=1.0, policy_weight=2.0, answer_loss_on=answer_loss_on
    )


def test_the_baseline_runs_only_the_items_that_drew(tmp_path: Path) -> None:
    """Keep-1.0 items draw nothing, so the top-k baseline pass skips them; an item's loss
    does not depend on which items share its packed row, so the skipped pass changes
    nothing."""
    model = STTSVideoQAModel.from_checkpoint(make_demo(tmp_path / "m", scorer="learned"))
    batch = [model.prepare(make_sample(i, "train")) for i in range(3)]
    keeps = [1.0, 0.5, 0.3]
    calls: list[tuple[int, float]] = []
    forward = model.forward

    def spy(items, ratios, aux_weight=0.5, explore=0.0):
        calls.append((len(items), explore))
        return forward(items, ratios, aux_weight=aux_weight, explore=explore)

    model.forward = spy  # type: ignore[method-assign]
    output, loss, policy = _step_backward(model, batch, keeps, _policy_config("draws"))
    assert calls == [(3, 1.0), (2, 0.0)]
    assert policy is not None and loss == pytest.approx(float(output.loss) + 2.0 * policy)
    with torch.no_grad():
        alone = forward(batch[1:], keeps[1:]).sample_losses
        together = forward(batch, keeps).sample_losses[1:]
    assert torch.allclose(alone, together, atol=1e-5)
    calls.clear()
    _step_backward(model, batch, [1.0, 1.0, 1.0], _policy_config("draws"))
    assert calls == [(3, 1.0)]


def test_with_answer_loss_on_top_k_the_draws_train_only_the_scorer(tmp_path: Path) -> None:
    """The LLM's gradient is exactly the top-k answer loss's; the scorer also hears the
    policy term. The top-k pass is backpropagated before the draws run (one graph at a
    time), and the two gradients add up in `.grad`."""
    model = STTSVideoQAModel.from_checkpoint(make_demo(tmp_path / "m", scorer="learned"))
    batch = [model.prepare(make_sample(i, "train")) for i in range(3)]
    keeps = [1.0, 0.5, 0.3]

    def grads() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        llm = [p.grad.clone() for p in model.hf.model.language_model.parameters()]
        scorer = [p.grad.clone() for p in model.scorer.parameters()]
        model.zero_grad(set_to_none=True)
        return llm, scorer

    forward, grad_ready = model.forward, []

    def spy(items, ratios, aux_weight=0.5, explore=0.0):
        llm = next(model.hf.model.language_model.parameters())
        grad_ready.append((len(items), explore, llm.grad is not None))
        return forward(items, ratios, aux_weight=aux_weight, explore=explore)

    model.forward = spy  # type: ignore[method-assign]
    torch.manual_seed(0)
    output, loss, policy = _step_backward(model, batch, keeps, _policy_config("top_k"))
    model.forward = forward  # type: ignore[method-assign]
    # the draws run after the top-k pass was backpropagated (its graph already freed)
    assert grad_ready == [(3, 0.0, False), (2, 1.0, True)]
    assert policy is not None and loss == pytest.approx(float(output.loss) + 2.0 * policy)
    llm, scorer = grads()
    model(batch, keeps).loss.backward()
    llm_top_k, scorer_top_k = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(llm, llm_top_k, strict=True))
    assert not all(torch.allclose(a, b) for a, b in zip(scorer, scorer_top_k, strict=True))


def test_frames_reach_the_config_from_the_cli_and_odd_or_short_clips_are_refused(
    tmp_path: Path,
) -> None:
    config = Train(out=tmp_path / "run", frames=[8, 32, 8]).config(tmp_path / "init")
    assert config.frames == (8, 32, 8)
    assert Train(out=tmp_path / "run").config(tmp_path / "init").frames == TrainConfig.frames
    for bad in ([6], [9], []):
        with pytest.raises(ValueError, match="frames"):
            TrainConfig(init=Path("i"), out=Path("o"), frames=tuple(bad))
    with pytest.raises(ValidationError, match="even numbers >= 8"):
        Train(out=tmp_path / "run", frames=[9])  # before cli_cmd builds a fresh demo


def test_device_reaches_the_config_from_the_cli_and_unknown_devices_are_refused(
    tmp_path: Path,
) -> None:
    assert Train(out=tmp_path / "run").config(tmp_path / "init").device == "cpu"
    assert Train(out=tmp_path / "run", device="cuda:1").config(tmp_path / "i").device == "cuda:1"
    for bad in ("gpu", "mps", "cuda:x"):
        with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
            TrainConfig(init=Path("i"), out=Path("o"), device=bad)
        with pytest.raises(ValidationError, match="cpu, cuda or cuda:N"):
            Train(out=tmp_path / "run", device=bad)  # before cli_cmd builds a fresh demo


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_on_a_machine_without_one_is_refused_before_anything_loads(tmp_path: Path) -> None:
    config = TrainConfig(init=tmp_path / "missing", out=tmp_path / "out", device="cuda")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        train(config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")
def test_training_on_cuda_matches_the_cpu_and_its_state_resumes_on_the_cpu(tmp_path: Path) -> None:
    """The GPU user's path (`train --device cuda`): same weights and batch give the CPU's
    first loss, and a state saved on the GPU goes on on the CPU (saved device-free)."""
    init = make_demo(tmp_path / "init", scorer="learned")
    short = SMOKE | {"steps": 4, "eval_every": 4, "save_every": 4}
    logs = {}
    for device in ("cpu", "cuda"):
        train(TrainConfig(init=init, out=tmp_path / device, frames=(16,), device=device, **short))
        logs[device] = read_log(tmp_path / device)
    assert logs["cuda"][0]["lm_loss"] == pytest.approx(logs["cpu"][0]["lm_loss"], rel=1e-2)
    assert all(np.isfinite(r["loss"]) for r in logs["cuda"])
    longer = short | {"steps": 6}
    train(TrainConfig(init=init, out=tmp_path / "cuda", frames=(16,), resume=True, **longer))
    assert [r["step"] for r in read_log(tmp_path / "cuda")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")
def test_bfloat16_on_cuda_trains_through_flash_varlen_near_the_float32_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a GPU user trains in: mixed bfloat16, the pruned windows through FlashAttention
    varlen (keep < 1 items), its first loss within bfloat16's reach of float32's."""
    from stts_vllm.core import attention

    calls = []
    flash = attention._flash_varlen
    monkeypatch.setattr(attention, "_flash_varlen", lambda *a: calls.append(1) or flash(*a))
    init = make_demo(tmp_path / "init", scorer="learned")
    short = SMOKE | {"steps": 2, "eval_every": 2, "save_every": 2, "keep_ratios": (0.5,)}
    logs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        train(TrainConfig(init=init, out=out, frames=(16,), device="cuda", dtype=dtype, **short))
        logs[dtype] = read_log(out)
    assert calls, "the pruned windows did not take FlashAttention varlen"
    assert logs["bfloat16"][0]["lm_loss"] == pytest.approx(logs["float32"][0]["lm_loss"], rel=5e-2)


def test_threads_reach_the_config_from_the_cli(tmp_path: Path) -> None:
    """Three runs on one 16-core GPU machine each took every core's thread and ran 6x slower
    per step (docs/gpu.md, "Training on a GPU"): `--threads` splits them."""
    assert Train(out=tmp_path / "run", threads=5).config(tmp_path / "init").threads == 5
    assert Train(out=tmp_path / "run").config(tmp_path / "init").threads is None
    with pytest.raises(ValidationError, match="threads"):
        Train(out=tmp_path / "run", threads=0)


def test_bfloat16_trains_in_mixed_precision_with_a_float32_scorer(tmp_path: Path) -> None:
    """`--dtype bfloat16`: the tower's matmuls run in bfloat16, the scorer's in float32 (its
    scores pick the kept units, as serving does in float32), and every weight and gradient
    stays float32."""
    model = STTSVideoQAModel.from_checkpoint(make_demo(tmp_path / "m", scorer="learned"))
    model.autocast_dtype = torch.bfloat16
    seen: dict[str, torch.Tensor] = {}
    model.scorer.register_forward_hook(lambda m, i, o: seen.update(units=i[0], scores=o))
    qkv = model.hf.model.visual.blocks[0].attn.qkv
    qkv.register_forward_hook(lambda m, i, o: seen.update(qkv=o))
    batch = [model.prepare(make_sample(i, "train")) for i in range(3)]
    out = model(batch, [0.5, 1.0, 0.3])
    out.loss.backward()
    assert seen["qkv"].dtype == torch.bfloat16
    assert seen["scores"].dtype == torch.float32
    torch.testing.assert_close(seen["scores"], model.scorer(seen["units"]))
    assert out.video_tokens == [144, 288, 86] and torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_dtype_reaches_the_config_from_the_cli(tmp_path: Path) -> None:
    assert Train(out=tmp_path / "r", dtype="bfloat16").config(tmp_path / "i").dtype == "bfloat16"
    assert Train(out=tmp_path / "r").config(tmp_path / "i").dtype == "float32"
    with pytest.raises(ValidationError, match="dtype"):
        Train(out=tmp_path / "r", dtype="float16")
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(init=Path("i"), out=Path("o"), dtype="float16")  # type: ignore[arg-type]
