"""Vision-tower time of one video at several keep ratios, on a live vLLM engine.

    .venv/bin/python -m experiments.vit_keep_ratio artifacts/demo-stts --frames 32 --size 224

Runs interleaved repetitions in one process (same weights, same input), prints a JSON line
per keep ratio with the median and spread, and the speedup of each ratio against 1.0.
The product benchmark (ViT + prefill + end to end, vs EVS, plots) is `bench/engine.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="frame side in pixels (x28)")
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.3])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch
    from vllm import LLM

    from stts_vllm.pruned_vision import pruned_vision_forward

    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=32768)
    model = llm.apply_model(lambda m: m)[0]
    visual = model.visual
    patch = visual.patch_size
    grid = [args.frames // 2, args.size // patch, args.size // patch]
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * patch * patch)

    def encode(keep: float) -> None:
        if keep >= 1.0:
            visual(pixels, grid_thw=[grid])  # the stock tower, as the model runs it at 1.0
        else:
            pruned_vision_forward(
                visual, pixels, [grid], [keep], config=model.stts_config, scorer=model.stts_scorer
            )

    times: dict[float, list[float]] = {k: [] for k in args.keep}
    with torch.inference_mode():
        for keep in args.keep:  # warm-up
            encode(keep)
        for _ in range(args.repeats):
            for keep in args.keep:
                start = time.perf_counter()
                encode(keep)
                times[keep].append(time.perf_counter() - start)
    base = statistics.median(times[max(args.keep)])
    for keep, values in times.items():
        median = statistics.median(values)
        print(
            json.dumps(
                {
                    "frames": args.frames,
                    "grid_thw": grid,
                    "keep_ratio": keep,
                    "vit_seconds_median": round(median, 5),
                    "vit_seconds_min": round(min(values), 5),
                    "vit_seconds_max": round(max(values), 5),
                    "speedup_vs_keep_1": round(base / median, 3),
                    "repeats": args.repeats,
                }
            )
        )


if __name__ == "__main__":
    main()
