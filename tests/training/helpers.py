"""What the training tests and the engine's trained-checkpoint tests share: a short real
training run (a few steps from scratch) as session fixtures, and how to read its log.

`tests/training/conftest.py` registers the fixtures for the training tests; a module
elsewhere imports them from here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stts_vllm.demo import make_demo
from stts_vllm.training.train import LOG_FILE, TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: where `python -m experiments.NAME` runs."""

SMOKE = {
    "steps": 8,
    "batch_size": 4,
    "warmup": 1,
    "eval_every": 8,
    "eval_samples": 8,
    "save_every": 4,
}


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of `stts-vllm train` after 8 steps from a fresh demo: OUT/checkpoint, OUT/last."""
    root = tmp_path_factory.mktemp("train")
    init = make_demo(root / "init", scorer="learned")
    out = root / "out"
    train(TrainConfig(init=init, out=out, frames=(16,), **SMOKE))
    return out


@pytest.fixture(scope="session")
def qwen3_scorer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of `stts-vllm train --init QWEN3_DEMO --mode scorer` (the frozen-base recipe on the
    other family) after 3 steps."""
    root = tmp_path_factory.mktemp("train-qwen3")
    init = make_demo(root / "init", scorer="learned", family="qwen3_vl")
    out = root / "out"
    steps = SMOKE | {"steps": 3, "eval_every": 3, "save_every": 3}
    train(TrainConfig(init=init, out=out, mode="scorer", frames=(16,), **steps))
    return out
