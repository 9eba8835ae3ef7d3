"""The data-parallel encoder path (`mm_encoder_tp_mode="data"`) through the live model. On
one rank the gather is the identity, so it must answer exactly like the plain path; the
sharding itself across real processes is `tests/test_sharded_videos.py`."""

from __future__ import annotations

from typing import Any

import pytest
from media import chat_prompt, moving_square_video, video_item
from vllm import SamplingParams

from tests.engine.helpers import live_model

PROMPT = {
    "prompt": chat_prompt("video", "video"),
    "multi_modal_data": {
        "video": [
            video_item(moving_square_video(12, 140, 196, seed=21)),
            video_item(moving_square_video(8, 112, 112, seed=22)),
        ]
    },
    "mm_processor_kwargs": {"stts_keep_ratio": 0.4},
}


def _tokens(llm: Any) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=8)
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    return list(out.outputs[0].token_ids)


@pytest.mark.parametrize("ckpt_name", ["demo_ckpt", "qwen3_ckpt"])
def test_sharded_path_answers_like_the_plain_path(
    engines, ckpt_name: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = engines.get(request.getfixturevalue(ckpt_name))
    model = live_model(llm)
    plain = _tokens(llm)

    calls: list[int] = []
    sharded = model._encode_sharded

    def spy(grids: list, *args: Any) -> Any:
        calls.append(len(grids))
        return sharded(grids, *args)

    monkeypatch.setattr(model, "use_data_parallel", True)
    monkeypatch.setattr(model, "_encode_sharded", spy)
    llm.llm_engine.reset_encoder_cache()  # encode again, not from the cache
    llm.reset_prefix_cache()
    assert _tokens(llm) == plain
    assert calls  # the videos went through the sharded path
