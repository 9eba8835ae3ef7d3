"""`make gpu-check` on a machine without a GPU: its CPU-checkable parts (arguments, the plan
of steps, the report) run as a dry run; the GPU steps themselves need a CUDA machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_dry_run_plans_every_step_and_writes_the_report(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    out = tmp_path / "report"
    result = _run("--dry-run", "--out", str(out), "--checkpoint", str(ckpt))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    assert (out / "gpu-check.png").stat().st_size > 0
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == [
        "engine-float32",
        "engine-bfloat16",
        "engine-bfloat16-v2-runner",
        "engine-bfloat16-cuda-graphs",
        "training-cuda",
        "bench-vision-tower",
        "bench-video-batches",
        "bench-sft-step",
        "bench-geometry",
        "bench-checkpoint",
    ]
    assert all(s["status"] == "planned" and s["checks"] for s in steps.values())
    assert report["passed"] is None and report["environment"]["dry_run"] is True
    assert steps["engine-bfloat16"]["env"]["VLLM_GPU_SYNC_CHECK"] == "error"
    assert steps["engine-bfloat16-v2-runner"]["env"]["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    bench = steps["bench-geometry"]["command"]
    assert bench[bench.index("--size") + 1] == "448" and "bfloat16" in bench
    frames = bench[bench.index("--frames") + 1 : bench.index("--max-model-len")]
    assert frames == ["16", "32", "64", "128", "256"]
    assert str(ckpt) in steps["bench-checkpoint"]["command"]
    batches = steps["bench-video-batches"]["command"]
    assert (
        "bench/video_batches.py" in batches and batches[batches.index("--dtype") + 1] == "bfloat16"
    )
    sft = steps["bench-sft-step"]["command"]
    assert sft[sft.index("--frames") + 1 : sft.index("--out")] == ["64", "128"]


def test_only_selects_steps_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = _run("--dry-run", "--out", str(out), "--only", "bench-geometry")
    assert result.returncode == 0, result.stderr
    names = [s["name"] for s in json.loads((out / "gpu-check.json").read_text())["steps"]]
    assert names == ["bench-geometry"]

    for bad, message in (
        (["--only", "nope"], "unknown step"),
        (["--frames", "15"], "even counts"),
        (["--checkpoint", str(tmp_path / "missing")], "no config.json"),
    ):
        result = _run("--dry-run", "--out", str(out), *bad)
        assert result.returncode != 0 and message in result.stderr, (bad, result.stderr)


def test_without_a_gpu_and_without_dry_run_it_says_so(tmp_path: Path) -> None:
    result = _run("--out", str(tmp_path))
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr


def test_the_training_steps_run_the_cuda_tests_and_the_tower_bench(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = _run("--dry-run", "--out", str(out), "--only", "training-cuda", "bench-vision-tower")
    assert result.returncode == 0, result.stderr
    steps = {s["name"]: s for s in json.loads((out / "gpu-check.json").read_text())["steps"]}
    tests = steps["training-cuda"]["command"]
    assert "tests/training/test_train.py" in tests and "tests/test_core_attention.py" in tests
    assert "tests/engine" not in tests and tests[tests.index("-k") + 1] == "cuda or flash"
    tower = steps["bench-vision-tower"]["command"]
    assert "bench/vision_tower.py" in tower and tower[tower.index("--device") + 1] == "cuda"
