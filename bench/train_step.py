"""Training step time (forward + backward + optimizer) at several keep ratios, one process.

    .venv/bin/python bench/train_step.py CHECKPOINT --batch-size 16 --frames 16 --out DIR

Same weights, same samples, interleaved repetitions; prints a JSON line per (vision blocks,
keep ratio) with the median and spread of the step time, the video tokens the LLM saw, the
speedup over keep 1.0 and over transformers' stock vision blocks at the same keep ratio;
`--out` also writes `train_step.json` and `train_step.png`. Packing of the pruned ViT and of
the LLM sequences is what turns pruning into time; running the vision blocks' windows as one
attention call per window length (`batched`, what training uses) rather than transformers'
one per window (`stock`) is what keeps that time small on the CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

from harness import saved_figure, time_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.3])
    parser.add_argument(
        "--blocks", nargs="+", choices=["batched", "stock"], default=["batched", "stock"]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write train_step.json and train_step.png")
    args = parser.parse_args()

    import torch

    from stts_vllm.training.model import STTSVideoQAModel
    from stts_vllm.training.videoqa import make_sample

    model = STTSVideoQAModel.from_checkpoint(args.checkpoint)
    model.train()
    batch = [model.prepare(make_sample(i, "train", args.frames)) for i in range(args.batch_size)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every repeat is alike

    def step(blocks: str, keep: float) -> int:
        model.stock_vision_blocks = blocks == "stock"
        out = model(batch, [keep] * len(batch))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return sum(out.video_tokens)

    runs = [(blocks, keep) for blocks in args.blocks for keep in args.keep]
    tokens = {run: step(*run) for run in runs}  # also the warm-up
    times = time_runs(
        {run: functools.partial(step, *run) for run in runs},
        args.repeats,
        sync=lambda: None,  # the CPU
        warmup=False,
    )
    median = {run: statistics.median(values) for run, values in times.items()}
    rows = []
    for (blocks, keep), values in times.items():
        record = {
            "blocks": blocks,
            "batch_size": args.batch_size,
            "frames": args.frames,
            "keep_ratio": keep,
            "video_tokens": tokens[blocks, keep],
            "step_seconds_median": round(median[blocks, keep], 4),
            "step_seconds_min": round(min(values), 4),
            "step_seconds_max": round(max(values), 4),
            "speedup_vs_keep_1": round(median[blocks, max(args.keep)] / median[blocks, keep], 3),
            "repeats": args.repeats,
        }
        if ("stock", keep) in median:
            record["speedup_vs_stock_blocks"] = round(
                median["stock", keep] / median[blocks, keep], 3
            )
        rows.append(record)
        print(json.dumps(record))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_step.json").write_text(json.dumps(rows, indent=2))
        plot(rows, args.out / "train_step.png")


def plot(rows: list[dict], path: Path) -> None:
    kinds = list(dict.fromkeys(r["blocks"] for r in rows))
    keeps = list(dict.fromkeys(r["keep_ratio"] for r in rows))
    width = 0.8 / len(kinds)
    with saved_figure(path, figsize=(6, 4)) as (_, ax):
        for i, kind in enumerate(kinds):
            mine = {r["keep_ratio"]: r for r in rows if r["blocks"] == kind}
            xs = [j + i * width for j in range(len(keeps))]
            ax.bar(xs, [mine[k]["step_seconds_median"] for k in keeps], width, label=kind)
        ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(keeps))])
        ax.set_xticklabels([f"keep {k}" for k in keeps])
        ax.set_ylabel("seconds per training step (median)")
        first = rows[0]
        ax.set_title(f"{first['batch_size']} samples x {first['frames']} frames; vision blocks")
        ax.legend()


if __name__ == "__main__":
    main()
