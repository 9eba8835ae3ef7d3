"""`train --data`'s step at Qwen2.5-VL-7B's size (random weights): time, tokens/s, peak memory.

    python bench/sft_step.py --device cuda --frames 64 128 --out DIR          # a GPU, ~8 min
    .venv/bin/python bench/sft_step.py --smoke --frames 8 --repeats 1          # CPU smoke

The model is transformers' Qwen2.5-VL at the 7B's shape (ViT 32 x 1280, LLM 28 x 3584, GQA
28/4, vocabulary 152,064) with a learned scorer, built in memory in `--weights-dtype`, and
trained by the same code as `stts-vllm train --data` (`STTSVideoQAModel`, the mode's trainable
weights, AdamW, gradient checkpointing of the LLM): one record of a `--frames`-frame video of
`--size`² frames and a short answer, at each `--keep`. `--mode auto` tries `full` and falls
back to `scorer+llm`, `lora`, `scorer` on running out of memory, and says which ran. Weights
in bfloat16 by default (pure bf16: a 7B's fp32 weights, gradients and Adam moments do not fit
one 80 GB card; `train --dtype bfloat16` keeps fp32 weights under autocast). Prints a JSON line
per (frames, keep) with the median step time, LLM tokens, tokens/s, peak memory and the
speedup over the largest keep; `--out` writes `sft_step.json` and `sft_step.png`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from harness import device_sync, saved_figure

# Qwen2.5-VL-7B-Instruct's text_config (the vision side: bench/vision_tower.py)
QWEN2_5_VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_window_layers": 28,
    "rope_parameters": {
        "mrope_section": [16, 24, 24],
        "rope_theta": 1000000.0,
        "rope_type": "default",
    },
}
TINY_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
             "max_window_layers": 2}  # fmt: skip
MODES = ("full", "scorer+llm", "lora", "scorer")


def build(args, tmp: Path):
    """The model (in memory) and the demo's tokenizer and processor, frames of `--size`."""
    import torch
    import transformers
    from transformers import AutoProcessor
    from vision_tower import QWEN2_5_VL_7B_VISION

    from stts_vllm.core import STTSConfig, STTSScorer
    from stts_vllm.demo import make_demo
    from stts_vllm.families import family_named, resolve_stts
    from stts_vllm.training.model import STTSVideoQAModel

    demo = make_demo(tmp / "demo", scorer="learned", overwrite=True)
    config = json.loads((demo / "config.json").read_text())
    vision = QWEN2_5_VL_7B_VISION | {"tokens_per_second": 2}
    text = dict(config["text_config"]) | (TINY_TEXT if args.smoke else QWEN2_5_VL_7B_TEXT)
    if args.smoke:
        vision = vision | {"depth": 4, "hidden_size": 64, "intermediate_size": 128,
                           "num_heads": 4, "fullatt_block_indexes": [3]}  # fmt: skip
    vision["out_hidden_size"] = text["hidden_size"]
    text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
    hf_config = transformers.Qwen2_5_VLConfig(
        **{k: v for k, v in config.items() if k.endswith("_token_id")},
        vision_config=vision,
        text_config=text,
    )
    hf_config._attn_implementation = "sdpa"
    dtype = getattr(torch, args.weights_dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        hf = transformers.Qwen2_5_VLForConditionalGeneration._from_config(hf_config, dtype=dtype)
    processor = AutoProcessor.from_pretrained(demo)
    pixels = args.size * args.size
    processor.video_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    family = family_named("qwen2_5_vl")
    prune_at = 1 if args.smoke else 3  # `stts-vllm convert`'s default on the real tower
    stts = resolve_stts(STTSConfig(keep_ratio=0.5, prune_at=prune_at, scorer="learned"), family)
    scorer = STTSScorer(vision["hidden_size"]).to(args.device)
    return STTSVideoQAModel(hf, processor, stts, scorer, family)


def sample(model, frames: int, size: int):
    """One record: a video of `frames` frames and a question, a few words of answer."""
    import numpy as np

    from stts_vllm.training.model import Prepared
    from stts_vllm.training.sft_data import Media, Part, Record, Turn
    from stts_vllm.training.sft_samples import tokenize_record

    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, size=(frames, size, size, 3), dtype=np.uint8)
    record = Record(
        turns=(
            Turn("user", (Part(media=0), Part(text="What happens in this video?"))),
            Turn("assistant", (Part(text="A square drifts to the right, then stops."),)),
        ),
        media=(Media("video", Path("synthetic.mp4")),),
        where="synthetic",
    )
    tokenized = tokenize_record(model.tokenizer, record)
    media = [model.inputs.video(video, 2.0)]
    return Prepared(tokenized.ids, tokenized.labels, media, tokenized.media_at)


def run(args, model, mode: str) -> list[dict]:
    import torch

    from stts_vllm.training.sft_train import add_lora, param_groups, set_trainable

    if mode == "lora":
        add_lora(model, 16, 32)
    set_trainable(model, mode)
    if args.gradient_checkpointing and mode != "scorer":
        model.hf.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model), lr=0.0)  # lr 0: every repeat alike
    cuda = args.device.startswith("cuda")
    sync = device_sync(args.device)

    rows = []
    for frames in args.frames:
        item = sample(model, frames, args.size)
        for keep in sorted(args.keep, reverse=True):
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            times, tokens = [], 0
            t, h, w = item.media[0].grid
            unpruned = len(item.ids) - 1 + t * h * w // 4  # the sample's tokens at keep 1.0
            for repeat in range(args.repeats + 1):  # the first is a warm-up
                sync()
                start = time.perf_counter()
                out = model([item], [keep])
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                if repeat:
                    times.append(time.perf_counter() - start)
                tokens = len(item.ids) - 1 + out.video_tokens[0]
            median = statistics.median(times)
            row = {
                "mode": mode,
                "frames": frames,
                "size": args.size,
                "keep": keep,
                "step_seconds": median,
                "spread_seconds": max(times) - min(times),
                "llm_tokens": tokens,
                # the data a step gets through: the sample's tokens at keep 1.0, per second
                "tokens_per_second": unpruned / median,
                "peak_gib": torch.cuda.max_memory_allocated(args.device) / 2**30 if cuda else None,
            }
            base = next((r for r in rows if r["frames"] == frames), None)
            row["speedup"] = base["step_seconds"] / median if base else 1.0
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def plot(rows: list[dict], png: Path) -> None:
    with saved_figure(png, dpi=100, figsize=(7, 4)) as (_, ax):
        for frames in sorted({r["frames"] for r in rows}):
            mine = [r for r in rows if r["frames"] == frames]
            steps = [r["step_seconds"] for r in mine]
            ax.plot([r["keep"] for r in mine], steps, "o-", label=f"{frames} frames")
        ax.set_xlabel("keep ratio")
        ax.set_ylabel("step time (s)")
        ax.set_title(f"train --data step, {rows[0]['mode']} mode, Qwen2.5-VL-7B shape")
        ax.legend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--size", type=int, default=448, help="frame side in pixels (x28)")
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--mode", choices=["auto", *MODES], default="auto")
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, seconds on a CPU (CI)")
    parser.add_argument("--out", type=Path, help="write sft_step.json and sft_step.png")
    args = parser.parse_args()

    import torch

    modes = MODES if args.mode == "auto" else (args.mode,)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            model = build(args, Path(tmp))
            try:
                rows = run(args, model, mode)
                break
            except torch.OutOfMemoryError as error:
                print(json.dumps({"mode": mode, "out_of_memory": str(error).splitlines()[0]}))
                del model
                torch.cuda.empty_cache()
    if not rows:
        raise SystemExit("no mode fit on this device")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        device = (
            torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
        )
        report = {
            "device": device,
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
        }
        (args.out / "sft_step.json").write_text(json.dumps(report, indent=2))
        plot(rows, args.out / "sft_step.png")


if __name__ == "__main__":
    main()
