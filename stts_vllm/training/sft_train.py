"""`stts-vllm train --data`: STTS fine-tuning of a real checkpoint on the user's own videos.

The STTS recipe of the procedural trainer (`train.py`): the LM loss on the assistant's tokens
reaches the scorer through the key bias, the temporal loss trains it directly, each sample's
keep ratio is drawn from `keep_ratios`. What changes is the data (`sft_data`, `sft_samples`:
records decoded as the server decodes them, in DataLoader workers), the modes (`scorer`,
`scorer+llm`, `full`, `lora`), and the scale: a token budget per micro-batch, gradient
accumulation, bf16 autocast, gradient checkpointing, and several processes under `torchrun`
(DDP for `scorer` and `lora`, FSDP2 for `full` and `scorer+llm`), each reading its shard, rank
0 writing logs and checkpoints.

One optimizer step's loss is the whole step's: the LM loss summed over every target token of
every micro-batch on every rank, divided by their count, plus `aux_weight` times the temporal
loss averaged the same way, so N processes step exactly as one process on the combined batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stts_vllm.training.model import Prepared, STTSVideoQAModel
from stts_vllm.training.sft_config import SFTConfig
from stts_vllm.training.sft_data import Record, RecordError, read_records
from stts_vllm.training.sft_samples import RecordPreparer
from stts_vllm.training.train import drop_records_after, lr_scale, write_dir_atomically

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
LORA_FILE = "lora.safetensors"
# What a resumed run must share with the run that saved the state.
RESUME_FIXED = (
    "data", "video_root", "skip_bad", "mode", "steps", "max_tokens_per_step", "grad_accum",
    "lr", "scorer_lr", "warmup", "aux_weight", "keep_ratios", "seed", "fps", "min_frames",
    "max_frames", "frame_min_pixels", "frame_max_pixels", "lora_rank", "lora_alpha",
    "world_size",
)  # fmt: skip


# -- processes --


@dataclass(frozen=True)
class Ranks:
    """This process's place under `torchrun` (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        ranks = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if device.startswith("cuda"):
            torch.cuda.set_device(ranks.local)  # NCCL's collectives run on the current device
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return ranks

    def sum(self, values: list[float]) -> list[float]:
        """`values` summed over the processes (as float64)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            tensor = tensor.to(backend_device)
            dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


# -- data --


def epoch_order(records: int, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation of every record, the same on every rank."""
    order = list(range(records))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def keep_for(seed: int, epoch: int, place: int, keep_ratios: tuple[float, ...]) -> float:
    """A sample's keep ratio, from its epoch and place in the epoch's permutation: the same
    draw whichever rank reads it."""
    return random.Random(f"{seed}/{epoch}/{place}").choice(keep_ratios)


@dataclass
class Position:
    """Where a rank is in the data: the epoch, and how many of its records it has used."""

    epoch: int = 0
    used: int = 0


class _Decoded(torch.utils.data.IterableDataset):
    """A rank's records epoch after epoch from a position, decoded: with W workers, worker w
    decodes every W-th one, and the DataLoader's round robin gives them back in order."""

    def __init__(
        self,
        records: list[Record],
        preparer: RecordPreparer,
        seed: int,
        ranks: Ranks,
        start: Position,
    ) -> None:
        self.records = records
        self.preparer = preparer
        self.seed = seed
        self.ranks = ranks
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int, Prepared | RecordError]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, first, k = self.start.epoch, self.start.used, 0
        while True:
            order = epoch_order(len(self.records), self.seed, epoch)
            places = range(self.ranks.rank, len(order), self.ranks.world)
            for used, place in enumerate(places):
                if used < first:
                    continue
                if k % workers == worker:
                    yield epoch, place, self._prepared(order[place])
                k += 1
            epoch, first = epoch + 1, 0

    def _prepared(self, index: int) -> Prepared | RecordError:
        record = self.records[index]
        try:
            return self.preparer(record)
        except RecordError as error:
            return error
        except Exception as error:  # a file that changed or broke since it was checked
            return RecordError(record.where, "undecodable_video", str(error))


class SampleStream:
    """The training samples of one rank, epoch after epoch: each epoch a fresh permutation of
    every record (`epoch_order`), this rank taking every `world`-th, decoded in `workers`
    DataLoader processes; each sample's keep ratio from `keep_for`, so the draws are the same
    however many processes share the data. Packs samples into micro-batches within the
    token budget."""

    def __init__(
        self,
        records: list[Record],
        preparer: RecordPreparer,
        config: SFTConfig,
        ranks: Ranks,
        position: Position,
    ) -> None:
        self.config = config
        self.position = Position(position.epoch, position.used)
        self.skipped: dict[str, int] = {}
        self._pending: tuple[Prepared, float] | None = None
        self._per_epoch = len(range(ranks.rank, len(records), ranks.world))
        workers = config.workers
        loader = torch.utils.data.DataLoader(
            _Decoded(records, preparer, config.seed, ranks, position),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=2 if workers else None,
            multiprocessing_context=_worker_context() if workers else None,
        )
        self._iterator = iter(loader)

    def _advance(self) -> None:
        self.position.used += 1
        if self.position.used == self._per_epoch:
            self.position = Position(self.position.epoch + 1, 0)

    def _next(self) -> tuple[Prepared, float]:
        while True:
            epoch, place, item = next(self._iterator)
            if isinstance(item, RecordError):
                self._advance()
                if not self.config.skip_bad:
                    raise item
                self.skipped[item.kind] = self.skipped.get(item.kind, 0) + 1
                logger.warning("skipped %s", item)
                continue
            return item, keep_for(self.config.seed, epoch, place, self.config.keep_ratios)

    def micro_batch(self) -> tuple[list[Prepared], list[float]]:
        """Samples up to the token budget (at least one), in stream order."""
        batch: list[Prepared] = []
        keeps: list[float] = []
        used = 0
        while True:
            if self._pending is not None:
                (item, keep), self._pending = self._pending, None
            else:
                item, keep = self._next()
            tokens = estimated_tokens(item, keep)
            if batch and used + tokens > self.config.max_tokens_per_step:
                self._pending = (item, keep)  # the next micro-batch's first: not used yet
                return batch, keeps
            self._advance()
            batch.append(item)
            keeps.append(keep)
            used += tokens

    def resume_position(self) -> Position:
        """Where a resumed run starts reading: after the samples used, at the pending one."""
        return Position(self.position.epoch, self.position.used)


def _worker_context() -> Any:
    """Workers forked from a fresh server process, not from this one: a process that has
    started CUDA, or OpenMP thread pools (vLLM's CPU kernels among them), gives forked children
    that crash on their first parallel op. The server imports the decoding code once."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["stts_vllm.training.sft_samples"])
    return context


def estimated_tokens(item: Prepared, keep: float) -> int:
    """The LLM tokens of a sample at `keep`: its text, and each medium's units (videos'
    pruned), ignoring Qwen3-VL's few timestamp tokens."""
    total = len(item.ids) - len(item.media)
    for media in item.media:
        t, h, w = media.grid
        units = t * h * w // 4  # 2x2 merge
        total += math.ceil(units * keep) if media.kind == "video" else units
    return total


# -- the model --


def set_trainable(model: STTSVideoQAModel, mode: str) -> None:
    """What `mode` trains gets gradients; everything else is frozen."""
    scorer = list(model.scorer.parameters()) if model.scorer is not None else []
    language = model.hf.model.language_model
    if mode == "full":
        base = list(model.hf.parameters())
    elif mode == "scorer+llm":
        base = list(language.parameters()) + list(model.hf.lm_head.parameters())
    elif mode == "lora":
        base = [p for name, p in language.named_parameters() if "lora_" in name]
    else:
        base = []
    wanted = {id(p) for p in base + scorer}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)


def param_groups(model: STTSVideoQAModel) -> list[dict[str, Any]]:
    """The trainable parameters as the optimizer takes them (after wrapping, which may have
    replaced them by shards): the scorer at `scorer_lr`, the rest at `lr`."""
    scorer = {id(p) for p in model.scorer.parameters()} if model.scorer is not None else set()
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if id(p) in scorer], "name": "scorer"}]
    base = [p for p in trained if id(p) not in scorer]
    if base:
        groups.append({"params": base, "name": "base"})
    return groups


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: STTSVideoQAModel, rank: int, alpha: int) -> None:
    """LoRA adapters (peft) on the LLM's linear layers, in place."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError("--mode lora needs peft: pip install 'stts-vllm[train]'") from error

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS))
    inject_adapter_in_model(config, model.hf.model.language_model)


def merge_lora(model: STTSVideoQAModel) -> None:
    """Fold the adapters into the base weights and drop them: plain linear layers again."""
    from peft.tuners.lora import LoraLayer

    language = model.hf.model.language_model
    for name, module in list(language.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = language.get_submodule(parent_name) if parent_name else language
            setattr(parent, child, module.get_base_layer())


def lora_state(model: STTSVideoQAModel) -> dict[str, torch.Tensor]:
    language = model.hf.model.language_model
    return {k: v.detach().cpu() for k, v in language.state_dict().items() if "lora_" in k}


def _wrap(model: STTSVideoQAModel, config: SFTConfig, ranks: Ranks, device: torch.device):
    """The module the steps call: the model itself, DDP (`scorer`, `lora`: few trainable
    weights, replicated) or FSDP2 (`full`, `scorer+llm`: the LLM's layers sharded, so a 7B's
    weights, gradients and optimizer state fit)."""
    if ranks.world == 1:
        return model
    if config.mode in ("scorer", "lora"):
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in model.hf.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


# -- the loop --


def train_sft(config: SFTConfig) -> Path:
    if config.threads:
        torch.set_num_threads(config.threads)
    ranks = Ranks.start(config.device)
    config.world_size = ranks.world
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r}: this torch build sees no CUDA device")
        device = torch.device("cuda", ranks.local if ranks.world > 1 else device.index or 0)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last"
    resuming = config.resume and (last / STATE_FILE).is_file()
    state = (
        torch.load(last / STATE_FILE, weights_only=False, map_location="cpu") if resuming else None
    )
    if state is not None:
        _check_resumable(state.get("config", {}), config, last)

    records, report = read_records(
        config.data, config.video_root, skip_bad=config.skip_bad, threads=8
    )
    if ranks.main:
        logger.info("data: %s", json.dumps(report.summary()))
    if len(records) < ranks.world:
        raise ValueError(f"{len(records)} usable record(s) for {ranks.world} processes")

    source = config.init
    if state is not None and config.mode in ("full", "scorer+llm"):
        source = last  # the trained weights; `scorer` and `lora` runs keep the base
    model = STTSVideoQAModel.from_checkpoint(source, scorer="learned")
    if state is not None and config.mode in ("scorer", "lora"):
        model.scorer.load_state_dict(state["scorer"])  # type: ignore[union-attr]
    if config.mode == "lora":
        add_lora(model, config.lora_rank, config.lora_alpha)
        if state is not None:
            model.hf.model.language_model.load_state_dict(state["lora"], strict=False)
    model.to(device)
    model.autocast_dtype = None if config.dtype == "float32" else getattr(torch, config.dtype)
    if config.gradient_checkpointing:
        model.hf.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    set_trainable(model, config.mode)
    frozen = _fingerprint(model) if config.mode == "scorer" else None
    step_model = _wrap(model, config, ranks, device)
    groups = param_groups(model)
    for group in groups:
        group["lr"] = config.scorer_lr if group["name"] == "scorer" else config.lr
        group["base_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    start = 0
    position = Position()
    if state is not None:
        _load_optimizer_state(model, optimizer, state["optimizer"], ranks)
        start = state["step"]
        position = Position(**state["positions"][ranks.rank])
        torch.set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", last, start)
        drop_records_after(out / LOG_FILE, start)
    elif ranks.main and (out / LOG_FILE).exists():
        (out / LOG_FILE).unlink()  # a fresh run's log starts empty

    pixels = (config.frame_min_pixels, config.frame_max_pixels)
    preparer = RecordPreparer(config.init, config.sampling, pixels)
    stream = SampleStream(records, preparer, config, ranks, position)
    writer = _tensorboard(out) if ranks.main else None
    log = (out / LOG_FILE).open("a") if ranks.main else None
    params = [p for g in groups for p in g["params"]]
    progress = _progress(start, config.steps, ranks)
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        micro = [stream.micro_batch() for _ in range(config.grad_accum)]
        t1 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale(step, config.warmup, config.steps)
        optimizer.zero_grad(set_to_none=True)
        record = _step(step_model, micro, config, ranks, sum(stream.skipped.values()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        record |= {
            "step": step + 1,
            "lr": optimizer.param_groups[-1]["lr"],
            "data_seconds": t1 - t0,
            "step_seconds": time.perf_counter() - t1,
        }
        if ranks.main:
            assert log is not None
            log.write(json.dumps(record) + "\n")
            log.flush()
            _to_tensorboard(writer, record)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
        progress.update(1)
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            positions = ranks.gather(asdict(stream.resume_position()))
            _save_state(model, optimizer, step + 1, last, config, positions, ranks)
    progress.close()
    if log is not None:
        log.close()
    if writer is not None:
        writer.close()
    if frozen is not None:
        changed = [name for name, value in _fingerprint(model).items() if value != frozen[name]]
        if changed:
            raise RuntimeError(f"scorer mode changed base weights: {changed[:5]}")
    final = out / "checkpoint"
    full = _full_state(model)  # every rank: gathering shards is a collective
    skipped_by_kind: dict[str, int] = {}
    for rank_skipped in ranks.gather(stream.skipped):
        for kind, count in rank_skipped.items():
            skipped_by_kind[kind] = skipped_by_kind.get(kind, 0) + count
    if ranks.main:
        if config.mode == "lora":
            merge_lora(model)
        _save_checkpoint(model, final, config, full)
        summary = {
            "config": json.loads(json.dumps(asdict(config), default=str)),
            "data": report.summary(),
            "skipped_while_training": skipped_by_kind,
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        plot_loss(out / LOG_FILE, out / "loss.png")
    ranks.barrier()
    return final


def _step(
    step_model: nn.Module, micro, config: SFTConfig, ranks: Ranks, skipped: int
) -> dict[str, Any]:
    """One optimizer step's gradients over `micro` (this rank's micro-batches), the loss
    normalised by the whole step's counts on every rank (summed with the bad records this
    rank has `skipped`, in one collective)."""
    pruned = [_pruned_videos(batch, keeps) for batch, keeps in micro]
    targets = sum(sum(item.labels) for batch, _ in micro for item in batch)
    total_targets, total_temporal, total_skipped = ranks.sum([targets, sum(pruned), skipped])
    sums = [0.0, 0.0, 0.0, 0.0]  # lm sum, temporal sum, video tokens, samples
    for i, (batch, keeps) in enumerate(micro):
        last = i == len(micro) - 1
        sync = nullcontext() if last or not hasattr(step_model, "no_sync") else step_model.no_sync()
        with sync:
            output = step_model(batch, keeps, aux_weight=config.aux_weight)
            assert output.temporal_count == pruned[i]
            loss = output.lm_sum / max(total_targets, 1.0)
            # the temporal sum is 0 (with the scorer in its graph) when nothing was pruned
            loss = loss + config.aux_weight * output.temporal_sum / max(total_temporal, 1.0)
            # DDP and FSDP average gradients over the processes; the loss is already the
            # whole step's, so undo the average
            (loss * ranks.world).backward()
        sums[0] += float(output.lm_sum.detach())
        sums[1] += float(output.temporal_sum.detach())
        sums[2] += sum(output.video_tokens)
        sums[3] += len(batch)
    lm_sum, temporal_sum, video_tokens, samples = ranks.sum(sums)
    lm_loss = lm_sum / max(total_targets, 1.0)
    temporal = temporal_sum / max(total_temporal, 1.0)
    return {
        "loss": lm_loss + config.aux_weight * temporal,
        "lm_loss": lm_loss,
        "temporal_loss": temporal,
        "targets": int(total_targets),
        "video_tokens": int(video_tokens),
        "samples": int(samples),
        "skipped": int(total_skipped),  # bad records met while training, on every rank
    }


def _pruned_videos(batch: list[Prepared], keeps: list[float]) -> int:
    """The items the temporal loss averages over: every video pruned (keep < 1)."""
    return sum(
        media.kind == "video" and keep < 1.0
        for item, keep in zip(batch, keeps, strict=True)
        for media in item.media
    )


def _fingerprint(model: STTSVideoQAModel) -> dict[str, bytes]:
    """Every base weight's bytes' digest: `scorer` mode must leave them bit-identical."""
    import hashlib

    return {
        name: hashlib.sha256(p.detach().cpu().contiguous().view(torch.uint8).numpy()).digest()
        for name, p in model.hf.named_parameters()
    }


def _progress(start: int, total: int, ranks: Ranks):
    from tqdm import tqdm

    return tqdm(initial=start, total=total, desc="train", disable=not ranks.main)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "training logs TensorBoard events: pip install 'stts-vllm[train]'"
        ) from error

    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _to_tensorboard(writer: Any, record: dict[str, Any]) -> None:
    if writer is None:
        return
    for key in ("loss", "lm_loss", "temporal_loss", "lr", "video_tokens", "step_seconds"):
        writer.add_scalar(f"train/{key}", record[key], record["step"])
    writer.flush()


def plot_loss(log: Path, png: Path) -> Path | None:
    """The loss curves of `log` as a PNG beside it (None without matplotlib or records)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "lm_loss", "temporal_loss"):
        ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("stts-vllm train --data")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# -- saving --


def _full_state(model: STTSVideoQAModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The LLM's and the scorer's weights on the CPU, gathered from FSDP shards (a collective:
    every rank calls it); None when nothing is sharded."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    hf = {k.removeprefix("hf."): v for k, v in state.items() if k.startswith("hf.")}
    scorer = {k.removeprefix("scorer."): v for k, v in state.items() if k.startswith("scorer.")}
    return hf, scorer


def _save_checkpoint(
    model: STTSVideoQAModel,
    where: Path,
    config: SFTConfig,
    full: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
) -> Path:
    """An STTS checkpoint vLLM serves as is: in `scorer` mode the base linked from `init`
    (only the scorer changed), otherwise the trained weights written in full."""

    def write(tmp: Path) -> None:
        if config.mode == "scorer":
            from stts_vllm.checkpoint import link_with_scorer, scorer_state_dict_to_file

            with tempfile.TemporaryDirectory() as scratch:
                scorer = Path(scratch) / "scorer.safetensors"
                assert model.scorer is not None
                scorer_state_dict_to_file(model.scorer.state_dict(), scorer)
                link_with_scorer(Path(config.init), tmp, model.stts.to_dict(), scorer)
        else:
            hf, scorer = full if full is not None else (None, None)
            model.save(tmp, Path(config.init), state_dict=hf, scorer_state=scorer)

    return write_dir_atomically(where, write)


def _save_state(
    model: STTSVideoQAModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    where: Path,
    config: SFTConfig,
    positions: list[dict[str, int]],
    ranks: Ranks,
) -> None:
    """What `--resume` needs, written by rank 0: the trained weights (`full`, `scorer+llm`:
    a checkpoint; `scorer`, `lora`: the scorer and adapters in the state), the optimizer,
    the step, every rank's data position, the rng."""
    optimizer_state = _optimizer_state(model, optimizer, ranks)
    full = _full_state(model) if config.mode in ("full", "scorer+llm") else None
    if not ranks.main:
        ranks.barrier()
        return

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        if config.mode in ("full", "scorer+llm"):
            hf, scorer = full if full is not None else (None, None)
            model.save(tmp, Path(config.init), state_dict=hf, scorer_state=scorer)
        state = {
            "optimizer": optimizer_state,
            "step": step,
            "positions": positions,
            "rng": torch.get_rng_state(),
            "config": _resume_fields(config),
        }
        if model.scorer is not None and full is None:
            state["scorer"] = {k: v.detach().cpu() for k, v in model.scorer.state_dict().items()}
        if config.mode == "lora":
            state["lora"] = lora_state(model)
        torch.save(state, tmp / STATE_FILE)

    write_dir_atomically(where, write)
    ranks.barrier()


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ranks: Ranks):
    """The optimizer's state keyed by parameter names (the same on any number of processes),
    whole (gathered from shards: every rank calls it) on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=ranks.world > 1, cpu_offload=ranks.world > 1)
    return get_optimizer_state_dict(model, optimizer, options=options)


def _load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], ranks: Ranks
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=ranks.world > 1)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def _resume_fields(config: SFTConfig) -> dict[str, Any]:
    fields = asdict(config)
    return {name: json.loads(json.dumps(fields[name], default=str)) for name in RESUME_FIXED}


def _check_resumable(saved: dict[str, Any], config: SFTConfig, where: Path) -> None:
    now = _resume_fields(config)
    changed = {k: (saved[k], now[k]) for k in RESUME_FIXED if k in saved and saved[k] != now[k]}
    if changed:
        diff = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in changed.items())
        raise ValueError(f"cannot resume {where}: {diff}; resume with the saved run's settings")
