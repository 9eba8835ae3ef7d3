"""Several pruned videos through the tower in one packed call vs one call each.

    python bench/video_batches.py --device cuda --dtype bfloat16 --out DIR      # about 2 min
    .venv/bin/python bench/video_batches.py --depth 4 --sizes 112 --frames 8   # CPU, small

What the engine does with the videos of one scheduled step (`STTSModelMixin`: one call of the
pruned tower for as many videos as the patch budget holds) against what vLLM 0.32's runner
does for pruning models (one call per video), on the core driver's pruned forward at
Qwen2.5-VL-7B's tower size (random weights; transformers' blocks, as `bench/vision_tower.py`:
the GPU machines have no vLLM). Per frame size: `--videos` videos of `--frames` frames at
keep `--keep`, forward only, interleaved repetitions, medians; prints a JSON line per size
with `speedup` = one-call-each ÷ packed, and writes `video_batches.json` + `.png` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from harness import device_sync, saved_figure, time_runs
from vision_tower import QWEN2_5_VL_7B_VISION, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--depth", type=int, default=QWEN2_5_VL_7B_VISION["depth"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 224], help="pixels (x28)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write video_batches.json and .png")
    parser.add_argument("--smoke", action="store_true", help="seconds-long: 4 blocks, 3 videos")
    args = parser.parse_args()
    if args.smoke:
        args.depth, args.sizes, args.frames, args.videos, args.repeats = 4, [112], 4, 3, 1

    import torch

    from stts_vllm.core import STTSConfig
    from stts_vllm.training.hf_vision import pruned_vision_forward

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    visual, scorer, config = build(args.depth, dtype, device)
    stts = STTSConfig(scorer="learned", selection="global", prune_at=min(3, args.depth - 2))

    sync = device_sync(device)

    def runs(videos: list[torch.Tensor], grid: tuple[int, int, int]) -> dict:
        """The two ways to encode `videos`: one call each, and one packed call."""
        packed, n = torch.cat(videos), len(videos)

        @torch.no_grad()
        def one_call_each() -> list[torch.Tensor]:
            return [
                pruned_vision_forward(
                    visual, v, [grid], [args.keep], config=stts, scorer=scorer
                ).embeds[0]
                for v in videos
            ]

        @torch.no_grad()
        def one_packed_call() -> list[torch.Tensor]:
            out = pruned_vision_forward(
                visual, packed, [grid] * n, [args.keep] * n, config=stts, scorer=scorer
            )
            return list(out.embeds)

        return {"each": one_call_each, "packed": one_packed_call}

    rows = []
    for size in args.sizes:
        side = size // config.patch_size
        grid = (args.frames // config.temporal_patch_size, side, side)
        width = 3 * config.temporal_patch_size * config.patch_size**2
        generator = torch.Generator().manual_seed(size)
        videos = [
            torch.randn(grid[0] * side * side, width, generator=generator).to(device, dtype)
            for _ in range(args.videos)
        ]
        calls = runs(videos, grid)
        alone, together = calls["each"](), calls["packed"]()
        worst = max(
            (a.float() - b.float()).abs().max().item() for a, b in zip(alone, together, strict=True)
        )
        times = time_runs(calls, args.repeats, sync)
        each, packed_s = statistics.median(times["each"]), statistics.median(times["packed"])
        row = {
            "size": size,
            "frames": args.frames,
            "videos": args.videos,
            "keep_ratio": args.keep,
            "patches_per_video": grid[0] * side * side,
            "device": str(device),
            "dtype": args.dtype,
            "depth": args.depth,
            "one_call_each_seconds": round(each, 5),
            "one_packed_call_seconds": round(packed_s, 5),
            "speedup": round(each / packed_s, 3),
            "max_abs_difference": worst,
            "repeats": args.repeats,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if device.type == "cuda":
        print(json.dumps({"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "video_batches.json").write_text(json.dumps(rows, indent=2))
        plot(rows, args.out / "video_batches.png")


def plot(rows: list[dict], path: Path) -> None:
    labels = [f"{r['videos']}x{r['frames']}f {r['size']}²" for r in rows]
    x = range(len(rows))
    with saved_figure(path, figsize=(6, 4)) as (_, ax):
        each = [r["one_call_each_seconds"] for r in rows]
        packed = [r["one_packed_call_seconds"] for r in rows]
        ax.bar([i - 0.2 for i in x], each, 0.4, label="one call each")
        ax.bar([i + 0.2 for i in x], packed, 0.4, label="packed")
        for i, r in enumerate(rows):
            ax.annotate(
                f"{r['speedup']:.2f}x", (i + 0.2, r["one_packed_call_seconds"]), ha="center"
            )
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"pruned tower, keep {rows[0]['keep_ratio']}, {rows[0]['device']}")
        ax.legend()


if __name__ == "__main__":
    main()
