"""Training step time (forward + backward + optimizer) at several keep ratios, one process.

    .venv/bin/python bench/train_step.py CHECKPOINT --batch-size 16 --frames 16

Same weights, same samples, interleaved repetitions; prints a JSON line per keep ratio with
the median and spread of the step time, the video tokens the LLM saw, and the speedup over
keep 1.0. Packing of the pruned ViT and of the LLM sequences is what turns pruning into time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.3])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from stts_vllm.training.model import STTSVideoQAModel
    from stts_vllm.training.videoqa import make_sample

    model = STTSVideoQAModel.from_checkpoint(args.checkpoint)
    model.train()
    batch = [model.prepare(make_sample(i, "train", args.frames)) for i in range(args.batch_size)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every repeat is alike

    def step(keep: float) -> int:
        out = model(batch, [keep] * len(batch))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return sum(out.video_tokens)

    times: dict[float, list[float]] = {k: [] for k in args.keep}
    tokens = {k: step(k) for k in args.keep}  # warm-up
    for _ in range(args.repeats):
        for keep in args.keep:
            start = time.perf_counter()
            step(keep)
            times[keep].append(time.perf_counter() - start)
    base = statistics.median(times[max(args.keep)])
    for keep, values in times.items():
        median = statistics.median(values)
        record = {
            "batch_size": args.batch_size,
            "frames": args.frames,
            "keep_ratio": keep,
            "video_tokens": tokens[keep],
            "step_seconds_median": round(median, 4),
            "step_seconds_min": round(min(values), 4),
            "step_seconds_max": round(max(values), 4),
            "speedup_vs_keep_1": round(base / median, 3),
            "repeats": args.repeats,
        }
        print(json.dumps(record))


if __name__ == "__main__":
    main()
