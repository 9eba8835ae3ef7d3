"""keep_ratio 1.0 is the stock model: same greedy tokens and logprobs as vLLM's own
Qwen2.5-VL on the same weights, although the STTS model runs in pruning mode (positions
travel with the embeddings and are re-placed by the runner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from media import chat_prompt, image, moving_square_video, video_item

from tests.engine.helpers import greedy_with_logprobs

VIDEO = video_item(moving_square_video(8, 140, 196))
TALL_IMAGE = image(252, 112)  # taller than wide: text after it resumes at max(h, w)

PROMPTS: dict[str, dict[str, Any]] = {
    "video": {"prompt": chat_prompt("video"), "multi_modal_data": {"video": [VIDEO]}},
    "image": {"prompt": chat_prompt("image"), "multi_modal_data": {"image": [TALL_IMAGE]}},
    "image+video": {
        "prompt": chat_prompt("image", "video"),
        "multi_modal_data": {"image": [TALL_IMAGE], "video": [VIDEO]},
    },
}


@pytest.fixture(scope="module")
def stock_and_stts(engines, stock_ckpt: Path, demo_ckpt: Path) -> dict[str, list]:
    names = list(PROMPTS)
    stock = greedy_with_logprobs(engines.get(stock_ckpt), [PROMPTS[n] for n in names])
    keep_one = {"mm_processor_kwargs": {"stts_keep_ratio": 1.0}}
    stts = greedy_with_logprobs(engines.get(demo_ckpt), [PROMPTS[n] | keep_one for n in names])
    return {"names": names, "stock": stock, "stts": stts}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_keep_one_gives_stock_tokens(stock_and_stts: dict[str, list], name: str) -> None:
    i = stock_and_stts["names"].index(name)
    stock_tokens, stock_logprobs = stock_and_stts["stock"][i]
    stts_tokens, stts_logprobs = stock_and_stts["stts"][i]
    assert stts_tokens == stock_tokens
    for ours, theirs in zip(stts_logprobs, stock_logprobs, strict=True):
        assert ours.keys() == theirs.keys()
        for token, value in theirs.items():
            assert ours[token] == pytest.approx(value, abs=1e-4)
