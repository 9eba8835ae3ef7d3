"""The quality recipes' stage runner (`experiments/stage.sh`): a multi-hour recipe is only as
good as the flags each stage hands to `stts-vllm train`, and a stopped run must skip what is
done. A stand-in CLI records the calls, so these run in milliseconds. Every shell script, the
product's and the experiments', must parse."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
SCRIPTS = sorted([*(ROOT / "scripts").glob("*.sh"), *EXPERIMENTS.glob("*.sh")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_shell_script_parses(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _stage(tmp_path: Path, call: str, **env: str) -> list[list[str]]:
    """Source stage.sh in TMP (its `.venv/bin/stts-vllm` is a recorder), run CALL, and
    return the argument lists the CLI received."""
    cli = tmp_path / ".venv" / "bin" / "stts-vllm"
    cli.parent.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "calls"
    cli.write_text(f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {log}\necho >> {log}\n')
    cli.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in {"DEVICE", "THREADS"}}
    source = shlex.quote(str(EXPERIMENTS / "stage.sh"))
    subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source {source}; {call}"],
        cwd=tmp_path,
        env={**clean, **env},
        check=True,
    )
    if not log.exists():
        return []
    return [shlex.split(line) for line in log.read_text().splitlines()]


def test_a_stage_trains_from_its_init_and_resumes(tmp_path: Path) -> None:
    calls = _stage(tmp_path, "stage out/b out/a 7 --steps 5 --tasks '[direction]'")
    assert calls == [
        [
            "train",
            "out/b",
            "--init",
            "out/a/checkpoint",
            "--seed",
            "7",
            "--steps",
            "5",
            "--tasks",
            "[direction]",
            "--resume",
            "true",
        ]
    ]


def test_a_first_stage_has_no_init(tmp_path: Path) -> None:
    (calls,) = _stage(tmp_path, 'stage out/a "" 3 --steps 5')
    assert "--init" not in calls
    assert calls[:4] == ["train", "out/a", "--seed", "3"]


def test_device_and_threads_reach_train_only_when_set(tmp_path: Path) -> None:
    (calls,) = _stage(tmp_path, 'stage out/a "" 0', DEVICE="cuda:1", THREADS="7")
    assert calls[-4:] == ["--device", "cuda:1", "--threads", "7"]
    (plain,) = _stage(tmp_path / "plain", 'stage out/a "" 0')
    assert "--device" not in plain and "--threads" not in plain


def test_a_finished_stage_is_skipped(tmp_path: Path) -> None:
    done = tmp_path / "out" / "a" / "checkpoint"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    assert _stage(tmp_path, 'stage out/a "" 0 --steps 5') == []
    # a stopped run (no whole checkpoint yet) goes on
    assert len(_stage(tmp_path, "stage out/b out/a 0 --steps 5")) == 1


def test_the_two_long_recipes_are_refused_together() -> None:
    result = subprocess.run(
        ["bash", str(EXPERIMENTS / "quality_distractor.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "CHAIN": "1", "CURRICULUM": "1"},
        timeout=60,
    )
    assert result.returncode == 2
    assert "two recipes" in result.stderr


@pytest.mark.parametrize("module", ["quality", "vit_keep_ratio"])
def test_the_experiment_commands_start(module: str) -> None:
    """`python -m experiments.NAME` from the repository root, as the recipes and the docs run
    it (the probes' commands run whole in tests/training)."""
    result = subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout
