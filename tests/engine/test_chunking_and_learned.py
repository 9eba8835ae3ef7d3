"""Chunked prefill with pruned videos, and the learned scorer through the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from media import chat_prompt, moving_square_video, video_item
from safetensors.torch import load_file
from vllm import SamplingParams

from stts_vllm.core import retained_count
from tests.engine.helpers import (
    VISION_START,
    Recorder,
    check_video_positions,
    demo_units,
    live_model,
)

VIDEO_TOKEN = 1007
PROMPTS = [
    {
        "prompt": chat_prompt("video", "video"),
        "multi_modal_data": {
            "video": [
                video_item(moving_square_video(12, 140, 196, seed=11)),
                video_item(moving_square_video(8, 112, 112, seed=12)),
            ]
        },
    },
    {
        "prompt": chat_prompt("video", question="Describe it. " * 20),
        "multi_modal_data": {"video": [video_item(moving_square_video(16, 168, 168, seed=13))]},
        "mm_processor_kwargs": {"stts_keep_ratio": 0.3},
    },
]


def _greedy_tokens(llm: Any) -> list[list[int]]:
    from vllm import SamplingParams

    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_chunked_prefill_gives_the_same_tokens(engines, demo_ckpt: Path) -> None:
    """Prompts of ~200 tokens prefilled 32 at a time: pruned media cross chunk boundaries and
    the runner recomputes positions chunk by chunk."""
    whole = _greedy_tokens(engines.get(demo_ckpt))
    chunked = _greedy_tokens(
        engines.get(demo_ckpt, max_num_batched_tokens=32, enable_chunked_prefill=True)
    )
    assert chunked == whole


@pytest.fixture
def learned(engines, learned_ckpt: Path) -> Any:
    return engines.get(learned_ckpt)


def test_learned_scorer_weights_are_loaded(learned: Any, learned_ckpt: Path) -> None:
    on_disk = load_file(str(learned_ckpt / "stts_scorer.safetensors"))
    scorer = live_model(learned).stts_scorer
    loaded = {f"stts_scorer.{n}": p.detach().cpu() for n, p in scorer.named_parameters()}
    assert loaded.keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        assert torch.equal(loaded[name], tensor), name


def test_learned_scorer_generates_with_pruned_counts(learned: Any) -> None:
    from vllm import SamplingParams

    outputs = learned.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    expected = [
        retained_count(6, 35, 0.5) + retained_count(4, 16, 0.5),
        retained_count(8, 36, 0.3),
    ]
    for out, count in zip(outputs, expected, strict=True):
        assert out.prompt_token_ids.count(VIDEO_TOKEN) == count
        assert len(out.outputs[0].token_ids) > 0


def test_learned_scorer_keeps_original_positions(
    learned: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(live_model(learned), monkeypatch)
    frames = moving_square_video(10, 168, 224, seed=14)
    (out,) = learned.generate(
        [{"prompt": chat_prompt("video"), "multi_modal_data": {"video": [video_item(frames)]}}],
        SamplingParams(temperature=0, max_tokens=2),
        use_tqdm=False,
    )
    ids, positions = rec.positions[-1]
    start = out.prompt_token_ids.index(VISION_START)
    check_video_positions(ids, positions, demo_units(10, 168, 224), rec.masks[0], start)
