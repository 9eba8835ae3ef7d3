"""The STTS vision tower at Qwen2.5-VL-7B's size (random weights), on any device.

    python bench/vision_tower.py --device cuda --dtype bfloat16 --frames 16 64 --out DIR
    .venv/bin/python bench/vision_tower.py --depth 4 --size 112 --frames 8      # CPU, small

What a GPU user's training (`train --device cuda`) and the engine's tower share: the core
driver's pruned forward (`stts_vllm.core.driver`) on transformers' blocks, here at the real
tower's width and depth (1280 wide, 32 blocks, windows of 112 px, full attention every 8th
block) instead of the demo's. Per frame count, one video at each keep ratio, forward alone
(inference) and forward + backward (training, every weight and the scorer), interleaved
repetitions in one process, against transformers' own tower at keep 1.0 (`stock`). Prints a
JSON line per row; `--out` also writes `vision_tower.json` and `vision_tower.png`. Weights
are in `--dtype` here; `train --dtype bfloat16` autocasts float32 weights instead (same
kernels, plus the casts). `speedup_vs_keep_1` is against the largest `--keep`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from harness import device_sync, saved_figure, time_runs

# Qwen2.5-VL-7B-Instruct's vision_config (the 3B and 72B share it).
QWEN2_5_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "window_size": 112,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "hidden_act": "silu",
}


def build(depth: int, dtype, device):
    """transformers' vision tower at the 7B's shape (random weights) and a learned scorer."""
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    from stts_vllm.core import STTSScorer

    shape = QWEN2_5_VL_7B_VISION | {"depth": depth}
    shape["fullatt_block_indexes"] = [i for i in shape["fullatt_block_indexes"] if i < depth]
    config = Qwen2_5_VLConfig(vision_config=shape).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=dtype)
    scorer = STTSScorer(config.hidden_size)  # float32, as serving and training keep it
    return visual.to(device), scorer.to(device), config


@contextmanager
def attention_kernel(kind: str) -> Iterator[None]:
    """`grouped`: the per-length SDPA path even where FlashAttention's varlen kernel fits, so
    one run measures what the kernel buys (`auto`: whatever `varlen_attention` picks)."""
    from stts_vllm.core import attention

    saved = attention.flash_varlen_fits
    if kind == "grouped":
        attention.flash_varlen_fits = lambda *_: False
    try:
        yield
    finally:
        attention.flash_varlen_fits = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--depth", type=int, default=QWEN2_5_VL_7B_VISION["depth"])
    parser.add_argument("--size", type=int, default=448, help="frame side in pixels (x28)")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.3])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write vision_tower.json and vision_tower.png")
    args = parser.parse_args()

    import torch

    from stts_vllm.core import STTSConfig
    from stts_vllm.core.attention import flash_varlen_fits
    from stts_vllm.training.hf_vision import pruned_vision_forward

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    visual, scorer, config = build(args.depth, dtype, device)
    # The converter's default prune_at, or the demo's 1 on a shallow smoke tower.
    stts = STTSConfig(scorer="learned", selection="global", prune_at=min(3, args.depth - 2))

    sync = device_sync(device)

    flash = flash_varlen_fits(*(torch.zeros(1, 1, 8, device=device, dtype=dtype),) * 3)
    # FlashAttention's varlen kernel where it fits (CUDA, half precision), and the grouped
    # SDPA next to it in the same run; the grouped SDPA alone elsewhere.
    kernels = ["auto", "grouped"] if flash else ["auto"]

    def attention_of(keep: float | None, kernel: str) -> str:
        """The path the pruned windows took (the dense blocks before the cut: grouped)."""
        if keep is None:
            return "transformers"
        return "flash-varlen" if flash and kernel == "auto" and keep < 1.0 else "grouped-sdpa"

    def measure(frames: int) -> list[dict]:
        rows = []
        side = args.size // config.patch_size
        grid = (frames // config.temporal_patch_size, side, side)
        patches = grid[0] * side * side
        width = 3 * config.temporal_patch_size * config.patch_size**2
        pixels = torch.randn(patches, width, device=device, dtype=dtype)
        grid_t = torch.tensor([grid], device=device)

        def forward(keep: float | None, kernel: str = "auto") -> torch.Tensor:
            if keep is None:
                return visual(pixels, grid_thw=grid_t).pooler_output
            with attention_kernel(kernel):
                out = pruned_vision_forward(
                    visual, pixels, [grid], [keep], config=stts, scorer=scorer, selection="global"
                )
            return out.embeds[0]

        def train_step(keep: float | None, kernel: str) -> None:
            out = forward(keep, kernel)
            out.float().square().mean().backward()
            visual.zero_grad(set_to_none=True)
            scorer.zero_grad(set_to_none=True)

        # At keep 1.0 every window has one length: `varlen_attention` takes the grouped SDPA
        # either way, so the grouped run is only timed where the two differ.
        towers = [("stock", None, "auto")] + [
            (f"stts@{keep}/{kernel}", keep, kernel)
            for kernel in kernels
            for keep in args.keep
            if kernel == "auto" or keep < 1.0
        ]
        runs: dict[str, Callable[[], object]] = {}
        for name, keep, kernel in towers:
            runs[f"forward {name}"] = lambda k=keep, a=kernel: torch.no_grad()(forward)(k, a)
            runs[f"train {name}"] = lambda k=keep, a=kernel: train_step(k, a)
        tokens = {k: int(torch.no_grad()(forward)(k).shape[0]) for k in [None, *args.keep]}
        times = time_runs(runs, args.repeats, sync)
        for pass_ in ("forward", "train"):
            base = statistics.median(times[f"{pass_} stts@{max(args.keep)}/{kernels[0]}"])
            stock = statistics.median(times[f"{pass_} stock"])
            for name, keep, kernel in towers:
                values = times[f"{pass_} {name}"]
                median = statistics.median(values)
                record = {
                    "pass": pass_,
                    "tower": "stock" if keep is None else "stts",
                    "attention": attention_of(keep, kernel),
                    "keep_ratio": 1.0 if keep is None else keep,
                    "frames": frames,
                    "size": args.size,
                    "depth": args.depth,
                    "device": str(device),
                    "dtype": args.dtype,
                    "tokens_out": tokens[keep],
                    "seconds_median": round(median, 5),
                    "seconds_min": round(min(values), 5),
                    "seconds_max": round(max(values), 5),
                    "speedup_vs_keep_1": round(base / median, 3),
                    "speedup_vs_stock": round(stock / median, 3),
                    "repeats": args.repeats,
                }
                rows.append(record)
                print(json.dumps(record), flush=True)
        return rows

    rows = [row for frames in args.frames for row in measure(frames)]
    if device.type == "cuda":
        print(json.dumps({"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vision_tower.json").write_text(json.dumps(rows, indent=2))
        plot(rows, args.out / "vision_tower.png")


def _label(row: dict) -> str:
    if row["tower"] == "stock":
        return "stock"
    return f"{row['keep_ratio']} {row['attention'].split('-')[0]}"


def plot(rows: list[dict], path: Path) -> None:
    frames = list(dict.fromkeys(r["frames"] for r in rows))
    figure = saved_figure(path, ncols=len(frames), figsize=(5 * len(frames), 4), squeeze=False)
    with figure as (_, axes):
        for ax, count in zip(axes[0], frames, strict=True):
            _plot_frames(ax, [r for r in rows if r["frames"] == count])


def _plot_frames(ax, mine: list[dict]) -> None:
    """One frame count: forward and training time of each tower and keep ratio."""
    names = list(dict.fromkeys(_label(r) for r in mine))
    for i, pass_ in enumerate(("forward", "train")):
        values = {_label(r): r for r in mine if r["pass"] == pass_}
        xs = [j + 0.4 * i for j in range(len(names))]
        ax.bar(xs, [values[n]["seconds_median"] for n in names], 0.4, label=pass_)
    ax.set_xticks([j + 0.2 for j in range(len(names))])
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("seconds per video (median)")
    first = mine[0]
    ax.set_title(
        f"{first['frames']} frames, {first['size']}px, depth {first['depth']}, "
        f"{first['dtype']} on {first['device']}",
        fontsize=9,
    )
    ax.legend()


if __name__ == "__main__":
    main()
