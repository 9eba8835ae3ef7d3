"""Engine benchmark: vision encoder, LLM prefill and request latency vs frame count, for the
stock architecture, STTS keep 1.0, STTS 0.5 / 0.3 and vLLM's EVS 0.5, on the "bench" geometry
(DESIGN.md §4b).

    .venv/bin/python bench/engine.py --frames 16 32 64 128 --repeats 3 --out artifacts/bench

Same random weights for every method (stock and EVS run the stock architecture over the same
files), same inputs; the three engines live side by side in one process, so each repetition
runs all five methods back to back; medians and spread. Stock vs STTS keep 1.0 is everything
the plugin costs when it prunes nothing. The encoder is timed
around the model's `embed_multimodal` (ViT + merger + STTS/EVS selection), prefill around its
`forward`, the request around `LLM.generate(max_tokens=1)` with prefix and multimodal caches
off. Each row carries the analytic FLOPs and the cost model's ideal speedup, so the gap to the
limit is visible. Writes `engine.json` and `engine.png`; `--smoke` is a seconds-long check.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

DEFAULT_FAMILY = "qwen2_5_vl"  # its bench checkpoint keeps the unsuffixed folder name

TARGETS = {
    "enc+prefill STTS 0.5 vs keep 1.0 @64f": 1.8,
    "enc+prefill STTS 0.5 vs keep 1.0 @128f": 2.0,
    "enc+prefill STTS 0.5 vs EVS 0.5": 1.45,
    "scorer+packing share of ViT time": 0.03,
    "biased block vs stock block time": 1.15,
    "request keep 1.0 vs stock @64f": 1.03,
}


@dataclass(frozen=True)
class Method:
    name: str
    engine: str  # "stts" or "evs"
    keep: float


METHODS = [
    Method("stock", "stock", 1.0),
    Method("keep 1.0", "stts", 1.0),
    Method("STTS 0.5", "stts", 0.5),
    Method("STTS 0.3", "stts", 0.3),
    Method("EVS 0.5", "evs", 0.5),
]


# --------------------------------------------------------------------------- cost model


def vit_flops(config: dict, steps: int, units_hw: int, keep: float, prune_at: int) -> float:
    """Multiply-adds x2 of the ViT on one video: per block, QKV/proj (4 d^2), gated MLP
    (3 d m) per patch, and attention over each patch's segment (window or whole step)."""
    v = config["vision_config"]
    d, m, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
    # Qwen2.5-VL: window attention except a few full blocks, gated MLP. Qwen3-VL: every
    # block attends over its whole step, plain MLP, plus one merger per deepstack tap.
    full = set(v.get("fullatt_block_indexes", range(depth)))
    mlp = 3 if "window_size" in v else 2
    unit = v["spatial_merge_size"] ** 2
    window_units = (v.get("window_size", 0) // v["patch_size"] // v["spatial_merge_size"]) ** 2
    total_units = steps * units_hw
    flops = 0.0
    for block in range(depth):
        units = total_units if block <= prune_at + 1 else _kept(steps, units_hw, keep)
        frac = units / total_units
        patches = units * unit
        segment = (units_hw if block in full else min(window_units, units_hw)) * unit * frac
        flops += 2 * patches * (4 * d * d + mlp * d * m) + 4 * patches * segment * d
    merger = (d * unit) ** 2 + d * unit * config["text_config"]["hidden_size"]
    mergers = 1 + len(v.get("deepstack_visual_indexes", []))
    return flops + 2 * _kept(steps, units_hw, keep) * merger * mergers


def llm_flops(config: dict, tokens: int) -> float:
    t = config["text_config"]
    d, m, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = d * t["num_key_value_heads"] // t["num_attention_heads"]
    per_token = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * m)
    attention = 2 * layers * tokens * tokens * d  # causal: half of 4 * n^2 * d
    return tokens * per_token + attention


def _kept(steps: int, units_hw: int, keep: float) -> int:
    from stts_vllm.core import retained_count

    return retained_count(steps, units_hw, keep) if keep < 1.0 else steps * units_hw


# --------------------------------------------------------------------------- measuring


class Probe:
    """Wall time of the live model's encoder and LLM forward calls (CPU: synchronous; on a GPU
    the probe synchronises around each call)."""

    def __init__(self, model: Any) -> None:
        import torch

        self.encoder = 0.0
        self.forward = 0.0
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self._wrap(model, "embed_multimodal", "encoder")
        self._wrap(model, "forward", "forward")

    def _wrap(self, model: Any, name: str, slot: str) -> None:
        inner = getattr(model, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self._sync()
            setattr(self, slot, getattr(self, slot) + time.perf_counter() - start)
            return out

        setattr(model, name, timed)

    def reset(self) -> None:
        self.encoder = self.forward = 0.0


def video(frames: int, size: int, seed: int) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    clip = np.repeat(background[None], frames, axis=0)
    for i in range(frames):
        y, x = (7 * i) % (size - 32), (11 * i) % (size - 32)
        clip[i, y : y + 32, x : x + 32] = (255, 40, 40)
    from stts_vllm.video_inputs import video_metadata

    return clip, video_metadata(frames, 2.0)


def measure(engines: dict, frames: int, size: int, repeats: int, tokenizer: Any) -> list[dict]:
    from vllm import SamplingParams

    from stts_vllm.training.model import chat_prompt

    params = SamplingParams(temperature=0.0, max_tokens=1)
    prompt = chat_prompt(tokenizer, "Describe the video.")
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    samples: dict[str, dict[str, list[float]]] = {m.name: {} for m in METHODS}
    tokens: dict[str, int] = {}
    prompt_tokens: dict[str, int] = {}  # all of them: Qwen3-VL's timestamps are never pruned
    order = [m for m in METHODS if m.engine in engines]
    for rep in range(repeats + 1):  # repetition 0 warms up
        for method in order:
            llm, probe = engines[method.engine]
            kwargs = {"stts_keep_ratio": method.keep} if method.engine == "stts" else {}
            request = {
                "prompt": prompt,
                "multi_modal_data": {"video": [video(frames, size, seed=rep)]},
                "mm_processor_kwargs": kwargs,
            }
            probe.reset()
            start = time.perf_counter()
            out = llm.generate([request], params, use_tqdm=False)[0]
            total = time.perf_counter() - start
            tokens[method.name] = out.prompt_token_ids.count(video_pad)
            prompt_tokens[method.name] = len(out.prompt_token_ids)
            if rep == 0:
                continue
            for key, value in (
                ("encoder_seconds", probe.encoder),
                ("prefill_seconds", probe.forward),
                ("request_seconds", total),
            ):
                samples[method.name].setdefault(key, []).append(value)
    rows = []
    for method in order:
        row = {"frames": frames, "method": method.name, "keep": method.keep}
        row["video_tokens"] = tokens[method.name]
        row["prompt_tokens"] = prompt_tokens[method.name]
        for key, values in samples[method.name].items():
            row[key] = statistics.median(values)
            row[key.replace("seconds", "spread")] = [min(values), max(values)]
        row["enc_prefill_seconds"] = row["encoder_seconds"] + row["prefill_seconds"]
        rows.append(row)
    return rows


def median_seconds(fns: list[Any], repeats: int) -> list[float]:
    """Median wall time of each of `fns`, after one warm-up call each, interleaved so that
    drift of the machine hits them alike."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            fn()
        for _ in range(repeats):
            for fn, spent in zip(fns, times, strict=True):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def biased_block_cost(model: Any, frames: int, size: int, repeats: int) -> dict:
    """Block `prune_at + 1` with the key bias (one stock-kernel call, heads a bias channel
    wider) against the same block run stock, on the same hidden states: the price of the bias."""
    import torch

    from stts_vllm.core.driver import plan_pruning
    from stts_vllm.pruned_vision import tower_adapter

    visual, config = model.visual, model.stts_config
    patch = visual.patch_size
    grid = [frames // 2, size // patch, size // patch]
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * patch * patch, device=visual.device)
    adapter = tower_adapter(visual)
    plan = plan_pruning(adapter, [grid], [0.5], config, config.selection)
    with torch.inference_mode():
        hidden, rotary, layout = adapter.embed(pixels, plan)
    bias = -torch.rand(hidden.shape[0], device=hidden.device) * 4

    def stock() -> None:
        adapter.run_block(plan.biased, hidden, rotary, layout)

    def biased() -> None:
        adapter.run_biased_block(plan.biased, hidden, rotary, plan.dense, bias)

    stock_s, biased_s = median_seconds([stock, biased], repeats)
    return {
        "frames": frames,
        "stock_block_seconds": stock_s,
        "biased_block_seconds": biased_s,
        "ratio": biased_s / stock_s,
    }


def overhead_share(model: Any, frames: int, size: int, repeats: int) -> dict:
    """Scorer + selection + key bias + packing time as a share of the pruned ViT's time."""
    import torch

    from stts_vllm.core import key_bias, pack_kept_units, retention_mask, score_units, token_rows
    from stts_vllm.pruned_vision import pruned_vision_forward, tower_adapter

    visual = model.visual
    patch, merge = visual.patch_size, visual.spatial_merge_size
    grid = [frames // 2, size // patch, size // patch]
    units = (grid[0], grid[1] // merge, grid[2] // merge)
    device = visual.device
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * patch * patch, device=device)
    config = model.stts_config
    feats = torch.randn(
        units[0], units[1] * units[2], merge * merge, visual.hidden_size, device=device
    )
    window = tower_adapter(visual).window

    def overhead() -> None:
        scores = score_units(feats, config.scorer, model.stts_scorer)
        mask = retention_mask(scores, 0.5, config.selection).reshape(-1)
        key_bias(scores, config.bias_floor, config.scorer)
        packed = pack_kept_units([units], [mask], window, merge * merge)
        token_rows(packed.kept_rows, merge * merge)

    def vit() -> None:
        pruned_vision_forward(
            visual,
            pixels,
            [grid],
            [0.5],
            config=config,
            scorer=model.stts_scorer,
            selection=config.selection,
        )

    over, vit_time = median_seconds([overhead, vit], repeats)
    return {
        "frames": frames,
        "overhead_seconds": over,
        "vit_seconds": vit_time,
        "share": over / vit_time,
    }


# --------------------------------------------------------------------------- report


def summarise(rows: list[dict], config: dict, prune_at: int, size: int) -> list[dict]:
    patch, merge = (
        config["vision_config"]["patch_size"],
        config["vision_config"]["spatial_merge_size"],
    )
    units_hw = (size // patch // merge) ** 2
    by = {(r["frames"], r["method"]): r for r in rows}
    for r in rows:
        steps = r["frames"] // 2
        keep = r["keep"] if r["method"].startswith("STTS") else 1.0
        r["vit_gflops"] = vit_flops(config, steps, units_hw, keep, prune_at) / 1e9
        r["prefill_gflops"] = llm_flops(config, r["prompt_tokens"]) / 1e9
    for r in rows:
        base = by.get((r["frames"], "keep 1.0"))
        if base:
            for key in (
                "encoder_seconds",
                "prefill_seconds",
                "request_seconds",
                "enc_prefill_seconds",
            ):
                r[key.replace("seconds", "speedup")] = base[key] / r[key]
            r["ideal_enc_prefill_speedup"] = (base["vit_gflops"] + base["prefill_gflops"]) / (
                r["vit_gflops"] + r["prefill_gflops"]
            )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, color in (
        ("stock", "#616161"),
        ("STTS 0.5", "#2e7d32"),
        ("STTS 0.3", "#81c784"),
        ("EVS 0.5", "#e6a03c"),
    ):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["frames"])
        if not mine:
            continue
        frames = [r["frames"] for r in mine]
        axes[0].plot(
            frames, [r["enc_prefill_speedup"] for r in mine], "o-", color=color, label=method
        )
        axes[0].plot(
            frames, [r["ideal_enc_prefill_speedup"] for r in mine], "--", color=color, alpha=0.5
        )
        axes[1].plot(frames, [r["request_speedup"] for r in mine], "o-", color=color, label=method)
    axes[0].set_title("encoder + prefill speedup vs keep 1.0 (dashed: FLOP ideal)")
    axes[1].set_title("request latency speedup vs keep 1.0")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("frames")
        ax.axhline(1.0, color="#999999", lw=0.8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def targets(rows: list[dict], overhead: dict, block_cost: dict) -> list[dict]:
    by = {(r["frames"], r["method"]): r for r in rows}
    out = []

    def add(name: str, value: float | None) -> None:
        goal = TARGETS[name]
        at_most = "share" in name or "block" in name or "vs stock" in name
        met = None if value is None else (value <= goal if at_most else value >= goal)
        out.append({"target": name, "goal": goal, "measured": value, "met": met})

    for frames, name in ((64, "@64f"), (128, "@128f")):
        r = by.get((frames, "STTS 0.5"))
        add(f"enc+prefill STTS 0.5 vs keep 1.0 {name}", r and r["enc_prefill_speedup"])
    largest = max((r["frames"] for r in rows), default=0)
    s, e = by.get((largest, "STTS 0.5")), by.get((largest, "EVS 0.5"))
    add(
        "enc+prefill STTS 0.5 vs EVS 0.5",
        s and e and e["enc_prefill_seconds"] / s["enc_prefill_seconds"],
    )
    add("scorer+packing share of ViT time", overhead.get("share"))
    add("biased block vs stock block time", block_cost.get("ratio"))
    one, stock = by.get((64, "keep 1.0")), by.get((64, "stock"))
    add(
        "request keep 1.0 vs stock @64f",
        one and stock and one["request_seconds"] / stock["request_seconds"],
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="default: build the bench geometry"
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--dtype", default="float32", help="bfloat16 for real weights on a GPU")
    parser.add_argument("--max-model-len", type=int, default=16384, help="fit the most frames")
    parser.add_argument(
        "--kv-cache-gib", type=float, default=2.0, help="KV cache of each of the two engines"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny demo model, 8 frames, 1 repeat")
    parser.add_argument(
        "--family",
        choices=["qwen2_5_vl", "qwen3_vl"],
        default=DEFAULT_FAMILY,
        help="geometry built when no --checkpoint is given",
    )
    args = parser.parse_args()

    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM

    from stts_vllm.checkpoint import derive, read_config
    from stts_vllm.demo import demo_geometry, make_bench, make_demo
    from stts_vllm.families import family_named

    tmp = Path(tempfile.mkdtemp(prefix="stts-bench-"))
    if args.smoke:
        args.frames, args.repeats = [8], 1
        # four merged units a side: frames the processor takes unresized
        args.size = 4 * demo_geometry(family_named(args.family)).unit_pixels
        checkpoint = make_demo(tmp / "demo", scorer="learned", family=args.family)
    else:
        name = "bench-checkpoint" + ("" if args.family == DEFAULT_FAMILY else f"-{args.family}")
        checkpoint = args.checkpoint or args.out / name
        if not (Path(checkpoint) / "config.json").is_file():
            print(f"building the bench geometry checkpoint in {checkpoint}", file=sys.stderr)
            make_bench(Path(checkpoint), overwrite=True, family=args.family)
    config = read_config(checkpoint)
    prune_at = config["stts"]["prune_at"]
    stock = derive(checkpoint, tmp / "stock", stock=True)
    engine_args = {
        "dtype": args.dtype,
        "enforce_eager": True,
        "max_model_len": args.max_model_len,
        "max_num_batched_tokens": args.max_model_len,
        "enable_prefix_caching": False,
        "mm_processor_cache_gb": 0,
        "limit_mm_per_prompt": {"video": 1},
        "seed": 0,
        "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30),
    }
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    # The engines live side by side (each with a fixed KV cache), so every repetition runs
    # stock, keep 1.0, STTS 0.5, STTS 0.3 (STTS engine) and EVS 0.5 (a stock engine: EVS is
    # engine-wide) back to back on the same clip: drift of the machine hits all methods alike.
    engines = {}
    for group, path, extra in (
        ("stock", stock, {}),
        ("stts", checkpoint, {}),
        ("evs", stock, {"video_pruning_rate": 0.5}),
    ):
        llm = LLM(model=str(path), **(engine_args | extra))
        engines[group] = (llm, Probe(llm.apply_model(lambda m: m)[0]))
    for frames in tqdm(args.frames, desc="frame counts", unit="setting"):
        rows += measure(engines, frames, args.size, args.repeats, tokenizer)
    stts_model = engines["stts"][0].apply_model(lambda m: m)[0]
    overhead = overhead_share(stts_model, max(args.frames), args.size, max(3, args.repeats))
    block_cost = biased_block_cost(stts_model, max(args.frames), args.size, max(15, args.repeats))
    # Speedups are against the STTS engine's keep-1.0 rows (bit-identical tokens to stock,
    # tests/engine); the stock rows show what the plugin's machinery costs on top.
    rows = summarise(rows, config, prune_at, args.size)
    result = {
        "machine": machine(),
        "geometry": "smoke (demo)" if args.smoke else "bench (DESIGN.md §4b)",
        "architecture": config["architectures"][0],
        "frame_size": args.size,
        "repeats": args.repeats,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rows": rows,
        "scorer_packing_overhead": overhead,
        "biased_block_cost": block_cost,
        "targets": targets(rows, overhead, block_cost),
    }
    (args.out / "engine.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "engine.png")
    print_table(result)
    print(f"wrote {args.out / 'engine.json'} and engine.png")


def machine() -> dict:
    import platform

    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def print_table(result: dict) -> None:
    columns = "frames method tokens enc_s prefill_s req_s enc+pf_x ideal_x req_x ViT_GF LLM_GF"
    print(" ".join(f"{c:>9}" for c in columns.split()))
    for r in sorted(result["rows"], key=lambda r: (r["frames"], r["method"])):
        nan = float("nan")
        cells = [
            f"{r['frames']}",
            r["method"],
            f"{r['video_tokens']}",
            f"{r['encoder_seconds']:.3f}",
            f"{r['prefill_seconds']:.3f}",
            f"{r['request_seconds']:.3f}",
            f"{r.get('enc_prefill_speedup', nan):.2f}",
            f"{r.get('ideal_enc_prefill_speedup', nan):.2f}",
            f"{r.get('request_speedup', nan):.2f}",
            f"{r['vit_gflops']:.1f}",
            f"{r['prefill_gflops']:.1f}",
        ]
        print(" ".join(f"{c:>9}" for c in cells))
    print()
    for t in result["targets"]:
        status = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        print(f"target {t['target']}: goal {t['goal']}, measured {value} -> {status}")


if __name__ == "__main__":
    main()
