"""Retained count and retention mask: the contract the processor and the model share."""

import pytest
import torch

from stts_vllm.core import retained_count, retention_mask, step_quotas
from stts_vllm.core.config import STTSConfigError


@pytest.mark.parametrize(
    ("steps", "units", "keep", "expected"),
    [
        (8, 16, 0.5, 64),  # half of the video's units
        (8, 16, 1.0, 128),  # everything
        (1, 16, 0.5, 16),  # a 1-step video keeps its only step
        (4, 16, 0.1, 16),  # never below one whole step (the first)
        (3, 5, 0.5, 8),  # 7.5 rounds half up
        (10, 10, 0.3, 30),
    ],
)
def test_retained_count(steps: int, units: int, keep: float, expected: int) -> None:
    assert retained_count(steps, units, keep) == expected


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.01, float("nan"), "0.5", True])
def test_retained_count_rejects_bad_keep_ratio(keep: object) -> None:
    with pytest.raises(STTSConfigError, match="keep_ratio"):
        retained_count(4, 4, keep)  # type: ignore[arg-type]


def test_mask_keeps_first_step_and_global_top_k() -> None:
    scores = torch.tensor(
        [[0.0, 0.0, 0.0], [0.9, 0.1, 0.8], [0.2, 0.95, 0.3]]
    )  # 9 units, keep 5: first step (3) + 2 best of the rest, wherever they are
    mask = retention_mask(scores, 5 / 9)
    assert mask.tolist() == [[True, True, True], [True, False, False], [False, True, False]]
    assert int(mask.sum()) == retained_count(3, 3, 5 / 9)


def test_mask_breaks_ties_by_position() -> None:
    scores = torch.full((3, 4), 0.5)
    mask = retention_mask(scores, 0.5)  # 6 of 12: first step + the first 2 of step 1
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [False] * 4]


def test_mask_count_matches_count_function_for_many_shapes() -> None:
    gen = torch.Generator().manual_seed(0)
    for steps, units, keep in [(1, 7, 0.5), (2, 9, 0.3), (16, 25, 0.5), (5, 1, 0.2), (9, 12, 0.77)]:
        mask = retention_mask(torch.rand(steps, units, generator=gen), keep)
        assert int(mask.sum()) == retained_count(steps, units, keep)
        assert bool(mask[0].all())


# --------------------------------------------------------------------------- per-step quota
@pytest.mark.parametrize(
    ("steps", "units", "keep", "expected"),
    [
        (4, 20, 0.5, [20, 7, 7, 6]),  # 40 = one whole step + 20 spread over 3 (earlier first)
        (8, 16, 1.0, [16] * 8),
        (1, 16, 0.5, [16]),
        (4, 16, 0.1, [16, 0, 0, 0]),  # never below the first step
        (3, 5, 0.5, [5, 2, 1]),
    ],
)
def test_step_quotas(steps: int, units: int, keep: float, expected: list[int]) -> None:
    assert step_quotas(steps, units, keep) == expected
    assert sum(expected) == retained_count(steps, units, keep)


def test_per_step_mask_ranks_within_each_step() -> None:
    scores = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.1, 0.8], [0.2, 0.95, 0.3]])
    # 5 of 9: the first step + 1 per later step, each step's own best (global top-2 would
    # take two units of step 2)
    mask = retention_mask(scores, 5 / 9, "per_step")
    assert mask.tolist() == [[True, True, True], [True, False, False], [False, True, False]]
    scores = torch.tensor([[0.0, 0.0], [0.9, 0.8], [0.1, 0.2]])
    assert retention_mask(scores, 4 / 6, "global").tolist() == [[True] * 2, [True] * 2, [False] * 2]
    assert retention_mask(scores, 4 / 6, "per_step").tolist() == [
        [True, True],
        [True, False],
        [False, True],
    ]


def test_per_step_mask_counts_are_the_quotas_for_many_shapes() -> None:
    gen = torch.Generator().manual_seed(1)
    for steps, units, keep in [(2, 9, 0.3), (16, 25, 0.5), (5, 1, 0.2), (9, 12, 0.77), (7, 4, 0.1)]:
        mask = retention_mask(torch.rand(steps, units, generator=gen), keep, "per_step")
        assert mask.sum(dim=1).tolist() == step_quotas(steps, units, keep)


def test_unknown_selection_is_refused() -> None:
    with pytest.raises(ValueError, match="selection"):
        retention_mask(torch.rand(2, 2), 0.5, "per_frame")
