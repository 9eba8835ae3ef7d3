"""A position inconsistency fails loudly and only where it arises."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from media import chat_prompt, moving_square_video, video_item

import stts_vllm.qwen2_5_vl as qwen2_5_vl
from stts_vllm.positions import encode_positions
from stts_vllm.stts_model import PositionMismatchError, STTSModelMixin

VIDEO_TOKEN, VISION_START = 1007, 1003


def _prompt(keep: float, seed: int) -> dict[str, Any]:
    return {
        "prompt": chat_prompt("video"),
        "multi_modal_data": {"video": [video_item(moving_square_video(8, 112, 112, seed=seed))]},
        "mm_processor_kwargs": {"stts_keep_ratio": keep},
    }


def _tokens(llm: Any, prompt: dict[str, Any]) -> list[int]:
    from vllm import SamplingParams

    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    return list(out.outputs[0].token_ids)


def test_placeholder_that_disagrees_with_the_tower_fails_only_its_request(
    engines, demo_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processor sizes one request's placeholder a token short of what the pruned tower
    returns (a forced inconsistency): that request is refused with a message naming it, and
    the same engine then answers other requests exactly as before."""
    llm = engines.get(demo_ckpt)
    good = _prompt(0.5, seed=1)
    before = _tokens(llm, good)

    real = qwen2_5_vl.retained_count

    def one_short(steps: int, units: int, keep: float) -> int:
        return real(steps, units, keep) - (1 if keep == pytest.approx(0.37) else 0)

    monkeypatch.setattr(qwen2_5_vl, "retained_count", one_short)
    with pytest.raises(ValueError, match=r"holds \d+ video tokens .* pruned tower returns \d+"):
        _tokens(llm, _prompt(0.37, seed=2))

    assert _tokens(llm, good) == before
    assert _tokens(llm, _prompt(0.6, seed=3))  # a new video still runs end to end


def _carrying(positions: torch.Tensor, width: int = 4) -> torch.Tensor:
    """Embeddings with `positions` ([3, N]) appended in vLLM's pruning format."""
    embeds = torch.zeros(positions.shape[1], width)
    return torch.cat([embeds, encode_positions(positions, embeds)], dim=1)


def test_positions_that_overrun_their_placeholder_raise() -> None:
    """More carried positions than placeholder tokens: the runner's step fails with a named
    error instead of keeping stale positions (a silently wrong answer)."""
    model = SimpleNamespace(config=SimpleNamespace(image_token_id=1006, video_token_id=1007))
    ids = [1, VISION_START, VIDEO_TOKEN, VIDEO_TOKEN, 1004, 2]
    positions = torch.arange(len(ids)).expand(3, -1).clone()
    carried = _carrying(torch.zeros(3, 3, dtype=torch.long))  # 3 kept units, 2 placeholders
    with pytest.raises(PositionMismatchError, match="do not fit the prompt"):
        STTSModelMixin.recompute_mrope_positions(model, ids, [carried], positions, 0)  # type: ignore[arg-type]

    fits = _carrying(torch.tensor([[0, 0], [0, 1], [1, 0]]))
    embeds, placed, delta = STTSModelMixin.recompute_mrope_positions(
        model,  # type: ignore[arg-type]
        ids,
        [fits],
        positions,
        0,
    )
    assert embeds[0].shape == (2, 4)
    assert placed[:, 2:4].tolist() == [[2, 2], [2, 3], [3, 2]]
    assert delta == int(placed.max()) + 1 - len(ids)
