"""Checkpoint building and conversion: the demo must load in transformers exactly as a real
Qwen2.5-VL would, and conversion must never copy (or alter) the source's weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stts_vllm.checkpoint import (
    SCORER_FILE,
    STOCK_ARCHITECTURE,
    STTS_ARCHITECTURE,
    convert,
    random_scorer_state_dict,
    read_config,
    scorer_state_dict_to_file,
    set_architecture,
    write_stts_block,
)
from stts_vllm.core.config import STTSConfigError
from stts_vllm.demo import SPECIAL_TOKENS, make_demo

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "ckpt", seed=0)


@pytest.fixture
def sharded_src(tmp_path: Path) -> Path:
    """A fake stock checkpoint with two shards and an index (weights are tiny stand-ins)."""
    src = tmp_path / "stock"
    src.mkdir()
    config = {
        "architectures": [STOCK_ARCHITECTURE],
        "model_type": "qwen2_5_vl",
        "vision_config": {"depth": 8, "hidden_size": 16},
    }
    (src / "config.json").write_text(json.dumps(config))
    save_file({"a": torch.zeros(2)}, str(src / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(src / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {"total_size": 16},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (src / INDEX).write_text(json.dumps(index))
    (src / "tokenizer.json").write_text("{}")
    return src


def _video_messages() -> list[dict]:
    content = [{"type": "video"}, {"type": "text", "text": "What moves?"}]
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------- make_demo
def test_demo_config_and_stts_block(demo: Path) -> None:
    config = read_config(demo)
    assert config["architectures"] == [STTS_ARCHITECTURE]
    assert config["stts"] == {
        "keep_ratio": 0.5,
        "prune_at": 1,
        "scorer": "heuristic",
        "bias_floor": -2.0,
        "scorer_hidden_size": None,
    }
    assert config["vision_config"]["depth"] == 4
    assert config["vision_config"]["fullatt_block_indexes"] == [3]
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [4, 6, 6]
    assert not (demo / SCORER_FILE).exists()


def test_demo_loads_in_transformers(demo: Path) -> None:
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(demo)
    processor = AutoProcessor.from_pretrained(demo)
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.image_token_id == ids["<|image_pad|>"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer) <= config.text_config.vocab_size

    text = processor.apply_chat_template(
        _video_messages(), tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>What moves?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert (
        tokenizer.apply_chat_template(_video_messages(), tokenize=False, add_generation_prompt=True)
        == text
    )

    frames = np.random.default_rng(0).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    inputs = processor(text=[text], videos=[frames], return_tensors="pt")
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert int((inputs["input_ids"] == ids["<|video_pad|>"]).sum()) == 2 * 4 * 6 // 4

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == config.text_config.vocab_size
    assert torch.isfinite(logits).all()


def test_demo_is_deterministic(tmp_path: Path) -> None:
    a = make_demo(tmp_path / "a", seed=3, scorer="learned")
    b = make_demo(tmp_path / "b", seed=3, scorer="learned")
    c = make_demo(tmp_path / "c", seed=4)
    for name in ("model.safetensors", SCORER_FILE, "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_demo_learned_scorer_file(tmp_path: Path) -> None:
    out = make_demo(
        tmp_path / "d", scorer="learned", scorer_hidden_size=32, prune_at=1, vit_depth=4
    )
    config = read_config(out)
    assert config["stts"]["scorer"] == "learned"
    assert config["stts"]["scorer_hidden_size"] == 32
    assert config["vision_config"]["fullatt_block_indexes"] == [3]
    weights = load_file(str(out / SCORER_FILE))
    assert weights and all(k.startswith("stts_scorer.") for k in weights)
    assert weights["stts_scorer.mlp.0.weight"].shape == (32, 2 * 64)


def test_demo_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(STTSConfigError, match=r"stts\.keep_ratio"):
        make_demo(tmp_path / "x", keep_ratio=0.0)
    with pytest.raises(STTSConfigError, match=r"stts\.prune_at"):
        make_demo(tmp_path / "x", prune_at=1, vit_depth=2)
    with pytest.raises(ValueError, match="vit_depth"):
        make_demo(tmp_path / "x", vit_depth=1)
    assert not (tmp_path / "x").exists()  # nothing written before validation passes


def test_set_architecture_and_write_stts_block(demo: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((demo / "config.json").read_text())
    set_architecture(ckpt, STOCK_ARCHITECTURE)
    assert read_config(ckpt)["architectures"] == [STOCK_ARCHITECTURE]
    parsed = write_stts_block(ckpt, {"keep_ratio": 0.25, "prune_at": 0})
    assert parsed.scorer == "heuristic"  # unnamed fields take their defaults
    assert read_config(ckpt)["stts"] == parsed.to_dict()
    with pytest.raises(STTSConfigError, match=r"stts\.prune_at"):
        write_stts_block(ckpt, {"keep_ratio": 0.25})  # default prune_at 3 > depth 2 - 2
    with pytest.raises(STTSConfigError, match=r"stts\.scorer"):
        write_stts_block(ckpt, {"scorer": "magic"})


# --------------------------------------------------------------------------- convert
def test_convert_symlinks_and_rewrites_config(demo: Path, tmp_path: Path) -> None:
    out = convert(demo, tmp_path / "out", keep_ratio=0.3, prune_at=0)
    for entry in demo.iterdir():
        if entry.name != "config.json":
            assert os.path.islink(out / entry.name), entry.name
            assert (out / entry.name).resolve() == entry.resolve()
    assert not os.path.islink(out / "config.json")
    config = read_config(out)
    assert config["architectures"] == [STTS_ARCHITECTURE]
    assert config["stts"]["keep_ratio"] == 0.3 and config["stts"]["scorer"] == "heuristic"
    assert read_config(demo)["stts"]["keep_ratio"] == 0.5  # source untouched


def test_convert_writes_index_with_scorer(sharded_src: Path, tmp_path: Path) -> None:
    weights = tmp_path / "scorer.safetensors"
    scorer_state_dict_to_file(random_scorer_state_dict(16, 8, seed=0), weights)
    out = convert(sharded_src, tmp_path / "out", scorer_weights=weights, prune_at=2)

    assert not os.path.islink(out / INDEX) and not os.path.islink(out / SCORER_FILE)
    assert os.path.islink(out / "model-00001-of-00002.safetensors")
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    scorer_keys = set(load_file(str(out / SCORER_FILE)))
    assert {k for k, v in weight_map.items() if v == SCORER_FILE} == scorer_keys
    assert weight_map["a"] == "model-00001-of-00002.safetensors"
    stts = read_config(out)["stts"]
    assert stts["scorer"] == "learned" and stts["scorer_hidden_size"] == 8
    assert json.loads((sharded_src / INDEX).read_text())["weight_map"].keys() == {"a", "b"}


def test_convert_rejects_unprefixed_scorer_keys(sharded_src: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    save_file({"mlp.0.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match="stts_scorer"):
        convert(sharded_src, tmp_path / "out", scorer_weights=bad)
    assert not (tmp_path / "out").exists()


def test_convert_rejects_scorer_of_wrong_width(sharded_src: Path, tmp_path: Path) -> None:
    weights = tmp_path / "scorer.safetensors"
    scorer_state_dict_to_file(random_scorer_state_dict(32, None, seed=0), weights)
    with pytest.raises(ValueError, match="do not fit"):
        convert(sharded_src, tmp_path / "out", scorer_weights=weights)


def test_convert_validates_stts_settings(sharded_src: Path, tmp_path: Path) -> None:
    with pytest.raises(STTSConfigError, match=r"stts\.keep_ratio"):
        convert(sharded_src, tmp_path / "out", keep_ratio=1.5)
    with pytest.raises(STTSConfigError, match=r"stts\.prune_at"):
        convert(sharded_src, tmp_path / "out", prune_at=7)  # depth 8: at most 6


def test_convert_validates_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        convert(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        convert(tmp_path / "empty", tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*not supported.*Qwen2_5_VL"):
        convert(other, tmp_path / "out")


def test_convert_refuses_non_empty_out(sharded_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert(sharded_src, out)
    assert (out / "keep.txt").exists()
    convert(sharded_src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    with pytest.raises(ValueError, match="must not be or contain the source"):
        convert(sharded_src, sharded_src.parent, overwrite=True)


def test_convert_of_stts_source_replaces_old_scorer(demo: Path, tmp_path: Path) -> None:
    learned = make_demo(tmp_path / "learned", scorer="learned")
    out = convert(learned, tmp_path / "out", prune_at=0)
    assert not (out / SCORER_FILE).exists()
    assert read_config(out)["stts"]["scorer"] == "heuristic"
