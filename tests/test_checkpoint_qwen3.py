"""The Qwen3-VL family's checkpoints: the tiny demo loads in transformers as a real Qwen3-VL
would, and `convert` takes stock Qwen3-VL / Qwen3-VL-MoE / Qwen3.5 directories (the family is
read from config.json) with settings validated for the family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stts_vllm.checkpoint import convert, derive, read_config
from stts_vllm.core.config import STTSConfigError
from stts_vllm.demo import SPECIAL_TOKENS, make_demo
from stts_vllm.families import FAMILIES


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("q3") / "ckpt", family="qwen3_vl")


def test_demo_config(demo: Path) -> None:
    config = read_config(demo)
    assert config["architectures"] == ["STTSQwen3VLForConditionalGeneration"]
    assert config["model_type"] == "qwen3_vl"
    assert config["stts"]["prune_at"] == 1 and "selection" not in config["stts"]
    vision = config["vision_config"]
    assert (vision["patch_size"], vision["depth"], vision["deepstack_visual_indexes"]) == (
        16,
        4,
        [0, 3],
    )


def test_demo_loads_in_transformers(demo: Path) -> None:
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(demo)
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)
    inputs = processor(
        text=[text],
        videos=[frames],
        videos_kwargs={"do_sample_frames": False},
        return_tensors="pt",
    )
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]]  # 16 px patches
    assert int((inputs["input_ids"] == ids["<|video_pad|>"]).sum()) == 2 * 4 * 6 // 4
    model = Qwen3VLForConditionalGeneration.from_pretrained(demo).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_convert_reads_the_family_from_config(family, tmp_path: Path) -> None:
    src = tmp_path / "stock"
    src.mkdir()
    config = {
        "architectures": [family.stock_architecture],
        "vision_config": {"depth": 8, "hidden_size": 16},
    }
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").write_bytes(b"")
    out = convert(src, tmp_path / "stts", prune_at=3)
    written = read_config(out)
    assert written["architectures"] == [family.stts_architecture]
    assert written["stts"]["prune_at"] == 3
    assert (out / "model.safetensors").is_symlink()
    # and back: the stock view of the STTS checkpoint is the source's architecture
    assert read_config(derive(out, tmp_path / "back", stock=True))["architectures"] == [
        family.stock_architecture
    ]


def test_global_selection_is_refused_for_timestamped_prompts(demo: Path, tmp_path: Path) -> None:
    from stts_vllm.checkpoint import write_stts_block

    view = derive(demo, tmp_path / "view")
    with pytest.raises(STTSConfigError, match=r"stts\.selection 'global'"):
        write_stts_block(view, {"prune_at": 1, "selection": "global"})
    assert write_stts_block(view, {"prune_at": 1, "selection": "per_step"}).selection == "per_step"


def test_prune_at_without_a_block_for_the_bias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(STTSConfigError, match=r"stts\.prune_at must be in \[0, 2\]"):
        make_demo(tmp_path / "bad", family="qwen3_vl", vit_depth=4, prune_at=3)
