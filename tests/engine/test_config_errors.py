"""Bad `stts` settings fail when vLLM configures the engine, with the field named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stts_vllm.checkpoint import read_config
from tests.engine.helpers import ENGINE_DEFAULTS


def _variant(src: Path, out: Path, **stts: Any) -> Path:
    """`src` with some `stts` fields replaced (weights linked)."""
    out.mkdir()
    for item in src.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item)
    config = read_config(src)
    config["stts"] = config["stts"] | stts
    (out / "config.json").write_text(json.dumps(config))
    return out


def _configure(model: Path, **overrides: Any) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), **(ENGINE_DEFAULTS | overrides)).create_engine_config()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("keep_ratio", 0.0, "stts.keep_ratio must be in (0, 1]"),
        ("keep_ratio", -0.2, "stts.keep_ratio must be in (0, 1]"),
        ("keep_ratio", 1.5, "stts.keep_ratio must be in (0, 1]"),
        ("prune_at", 3, "stts.prune_at must be in [0, 2]"),  # demo ViT depth 4
        ("prune_at", -1, "stts.prune_at must be >= 0"),
        ("scorer", "oracle", "stts.scorer must be one of"),
        ("bias_floor", 1.0, "stts.bias_floor must be a negative number"),
    ],
)
def test_bad_stts_field_fails_at_configuration(
    demo_ckpt: Path, tmp_path: Path, field: str, value: Any, message: str
) -> None:
    model = _variant(demo_ckpt, tmp_path / "bad", **{field: value})
    with pytest.raises(ValueError) as info:
        _configure(model)
    assert message in str(info.value)


def test_valid_checkpoint_turns_pruning_mode_on(demo_ckpt: Path) -> None:
    config = _configure(demo_ckpt)
    assert config.model_config.multimodal_config.is_multimodal_pruning_enabled()


def test_evs_flag_on_an_stts_checkpoint_is_refused(demo_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="video-pruning-rate"):
        _configure(demo_ckpt, video_pruning_rate=0.5)


def test_learned_scorer_without_weights_fails_at_load(demo_ckpt: Path, tmp_path: Path) -> None:
    """Weights are only known when the engine loads them: run a real engine start in a child
    process (a failed engine start leaves this process's engine state unusable)."""
    model = _variant(demo_ckpt, tmp_path / "learned-no-weights", scorer="learned")
    code = (
        "from vllm import LLM\n"
        f"LLM(model={str(model)!r}, dtype='float32', enforce_eager=True, max_model_len=4096)\n"
    )
    env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode != 0
    assert "stts.scorer is 'learned' but the checkpoint has no scorer weights" in result.stderr


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("selection", "global", "stts.selection 'global' does not fit"),
        ("selection", "per_frame", "stts.selection must be one of"),
        ("prune_at", 3, "stts.prune_at must be in [0, 2]"),  # Qwen3 demo ViT depth 4
    ],
)
def test_bad_qwen3_stts_field_fails_at_configuration(
    qwen3_ckpt: Path, tmp_path: Path, field: str, value: Any, message: str
) -> None:
    model = _variant(qwen3_ckpt, tmp_path / "bad", **{field: value})
    with pytest.raises(ValueError) as info:
        _configure(model)
    assert message in str(info.value)


def test_valid_qwen3_checkpoint_turns_pruning_mode_on(qwen3_ckpt: Path) -> None:
    config = _configure(qwen3_ckpt)
    assert config.model_config.multimodal_config.is_multimodal_pruning_enabled()
