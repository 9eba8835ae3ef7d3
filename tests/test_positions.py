"""Position columns carried with media embeddings, and placing them into a prompt."""

import itertools

import pytest
import torch

from stts_vllm.core import mrope_positions
from stts_vllm.positions import (
    POSITION_LIMIT,
    decode_positions,
    encode_positions,
    media_runs,
    place_media_positions,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_positions_survive_low_precision_embeddings(dtype: torch.dtype) -> None:
    positions = mrope_positions(400, 3, 5, 2.0)  # t up to 798: not exact in bf16 as is
    like = torch.zeros(1, dtype=dtype)
    decoded = decode_positions(encode_positions(positions, like))
    assert torch.equal(decoded[:3], positions)
    assert decoded[3].unique().tolist() == [int(positions.max()) + 1]  # where text resumes


def test_large_positions_survive_bfloat16() -> None:
    positions = torch.tensor([[0, 255, 256, 65535, 65536, POSITION_LIMIT - 1], [0] * 6, [7] * 6])
    decoded = decode_positions(encode_positions(positions, torch.zeros(1, dtype=torch.bfloat16)))
    assert torch.equal(decoded[:3], positions)


def test_media_at_the_very_start_of_a_prompt() -> None:
    media = torch.tensor([1, 1, 0, 0]).bool()
    item = torch.tensor([[0, 1], [0, 0], [0, 0], [2, 2]])
    placed = place_media_positions(media, [item], torch.arange(4).expand(3, -1).clone(), 0)
    assert placed[:, :2].tolist() == [[0, 1], [0, 0], [0, 0]]


def test_media_runs() -> None:
    media = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 1])
    assert media_runs(media.bool()) == [(1, 3), (5, 6), (7, 10)]


def _prompt() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """text(2) <start> media(4) <end> text(1) <start> media(3) <end> text(2)."""
    media = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]).bool()
    initial = torch.arange(16).expand(3, -1).clone()  # placeholder columns get overwritten
    items = [
        torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0], [2, 2, 2, 2]]),
        torch.tensor([[0, 2, 4], [1, 1, 0], [0, 1, 1], [5, 5, 5]]),
    ]
    return media, initial, items


def test_place_whole_prompt() -> None:
    media, initial, items = _prompt()
    placed = place_media_positions(media, items, initial, num_computed_tokens=0)
    assert placed[:, 3:7].tolist() == (items[0][:3] + 3).tolist()  # base: vision start (2) + 1
    assert placed[:, 10:13].tolist() == (items[1][:3] + 10).tolist()
    assert torch.equal(placed[:, ~media], initial[:, ~media])  # text untouched


def test_place_in_chunks_matches_whole_prompt() -> None:
    media, initial, items = _prompt()
    whole = place_media_positions(media, items, initial, 0)
    for boundaries in ([0, 3, 16], [0, 5, 11, 16], [0, 4, 8, 12, 16], [0, 7, 16]):
        positions = initial
        for lo, hi in itertools.pairwise(boundaries):
            slices = []
            for (start, end), item in zip(media_runs(media), items, strict=True):
                a, b = max(start, lo), min(end, hi)
                if a < b:
                    slices.append(item[:, a - start : b - start])
            positions = place_media_positions(media, slices, positions, lo)
        assert torch.equal(positions, whole), boundaries


def test_slice_longer_than_its_placeholder_is_refused() -> None:
    media, initial, _items = _prompt()
    with pytest.raises(ValueError, match="overruns"):
        place_media_positions(media, [torch.zeros(4, 9, dtype=torch.long)], initial, 0)


def test_timestamped_steps_place_in_chunks_like_the_whole_prompt() -> None:
    """Qwen3-VL: one item is several runs (one per temporal step, each after its own
    timestamp and vision start); the runner's slices cover media tokens in prompt order and
    may cut a run anywhere. Every chunking gives the whole prompt's placement, and each kept
    unit lands at (0, y, x) after its own step's vision start."""
    from stts_vllm.core import timestamped_video_positions

    vs, ve, pad, ts = 1003, 1004, 1007, 27
    keep = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)  # 2x2 units
    span = [ts, vs, pad, pad, pad, pad, ve, ts, vs, pad, pad, ve, ts, vs, pad, ve]
    ids = torch.tensor([5, 6, vs, *span, ve, 9])  # the outer vision start / end are text

    def prompt_positions(keep_mask: torch.Tensor | None) -> torch.Tensor:
        video, after = timestamped_video_positions(
            span, 2, 2, 3, video_token=pad, vision_start=vs, vision_end=ve, keep_mask=keep_mask
        )
        return torch.cat(
            [torch.arange(3).expand(3, -1), video, torch.arange(2).expand(3, -1) + after], 1
        )

    initial, exact = prompt_positions(None), prompt_positions(keep)
    # carried columns are relative to each step's start: (0, y, x) of the kept units
    units = keep.reshape(-1).nonzero().flatten() % 4
    carried = torch.stack([torch.zeros_like(units), units // 2, units % 2, units * 0])
    media = ids == pad
    whole = place_media_positions(media, [carried], initial, 0)
    assert torch.equal(whole, exact)
    for boundaries in ([0, 9, 30], [0, 5, 12, 17, 30], [0, 14, 15, 30]):
        positions = initial
        done = 0
        for lo, hi in itertools.pairwise(boundaries):
            count = int(media[lo:hi].sum())
            positions = place_media_positions(
                media, [carried[:, done : done + count]] if count else [], positions, lo
            )
            done += count
        assert torch.equal(positions, exact), boundaries
