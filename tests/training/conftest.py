"""A short real training run (a few steps from scratch), shared by the training tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from stts_vllm.checkpoint import make_demo
from stts_vllm.training.train import LOG_FILE, TrainConfig, train

BENCH = Path(__file__).resolve().parents[2] / "bench"

SMOKE = {
    "steps": 8,
    "batch_size": 4,
    "warmup": 1,
    "eval_every": 8,
    "eval_samples": 8,
    "save_every": 4,
}


def load_bench_script(name: str) -> ModuleType:
    """`bench/NAME.py` as a module: the bench scripts are not a package, their tests call
    their functions directly."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
