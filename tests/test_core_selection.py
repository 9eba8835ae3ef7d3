"""Retained count and retention mask: the contract the processor and the model share."""

import pytest
import torch

from stts_vllm.core import retained_count, retention_mask, sample_retention, step_quotas
from stts_vllm.core.config import STTSConfigError
from stts_vllm.core.selection import _draw_log_prob


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


def test_mask_spreads_ties_over_time() -> None:
    scores = torch.full((3, 4), 0.5)
    mask = retention_mask(scores, 0.5)  # 6 of 12: first step + 1 of each later step
    assert mask.tolist() == [[True] * 4, [True, False, False, False], [True, False, False, False]]
    # A saturated scorer: five units of each later step score exactly 1.0; keep 1 + 6 of 4 x 8.
    # Position order would take five from step 1 and one from step 2, and none from step 3.
    scores = torch.zeros(4, 8)
    scores[1:, 2:7] = 1.0
    scores[3, 0] = 0.9
    kept = retention_mask(scores, 14 / 32)[1:]
    assert kept.sum(dim=1).tolist() == [2, 2, 2]
    assert bool(kept[:, 2].all() and kept[:, 3].all()) and not kept[2, 0]
    # Distinct scores still decide: ties only order units of equal score.
    scores[3, 0] = 2.0
    assert retention_mask(scores, 14 / 32)[3, 0]


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


@pytest.mark.parametrize("selection", ["global", "per_step"])
def test_explored_draws_have_the_top_k_shape(selection: str) -> None:
    gen = torch.Generator().manual_seed(2)
    for steps, units, keep in [(2, 9, 0.3), (16, 25, 0.5), (1, 4, 0.5), (9, 12, 0.77)]:
        scores = torch.rand(steps, units, generator=gen)
        mask, log_prob = sample_retention(scores, keep, selection, generator=gen)
        top_k = retention_mask(scores, keep, selection)
        assert mask[0].all() and int(mask.sum()) == int(top_k.sum())
        if selection == "per_step":
            assert mask.sum(dim=1).tolist() == step_quotas(steps, units, keep)
        assert float(log_prob) <= 0.0


def test_an_explored_single_pick_follows_the_softmax_of_the_logits() -> None:
    """One unit drawn of three: P(unit) = softmax(logit(score) / temperature), and the returned
    log-probability is that probability's log (what makes the REINFORCE term unbiased)."""
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.5, 0.9]])
    temperature = 2.0
    expected = torch.softmax(torch.logit(scores[1]) / temperature, dim=0)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(4000):
        mask, log_prob = sample_retention(scores, 4 / 6, temperature=temperature, generator=gen)
        (pick,) = mask[1].nonzero()[0].tolist()
        counts[pick] += 1
        assert float(log_prob) == pytest.approx(float(expected[pick].log()), abs=1e-5)
    torch.testing.assert_close(counts / counts.sum(), expected, atol=0.03, rtol=0)


def test_an_explored_ordered_draw_has_the_plackett_luce_probability() -> None:
    scores = torch.tensor([[1.0] * 4, [0.1, 0.4, 0.6, 0.95]])
    logits = torch.logit(scores[1])
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        mask, log_prob = sample_retention(scores, 6 / 8, generator=gen)  # 2 of the 4 drawn
        kept = mask[1].nonzero().flatten().tolist()
        # Either order of the two kept units could have been the draw; the returned value is
        # the log-probability of one of them, per unit drawn.
        orders = [kept, kept[::-1]]
        values = []
        for a, b in orders:
            first = logits[a] - torch.logsumexp(logits, 0)
            rest = [i for i in range(4) if i != a]
            second = logits[b] - torch.logsumexp(logits[rest], 0)
            values.append(float((first + second) / 2))
        assert any(abs(float(log_prob) - v) < 1e-5 for v in values), (kept, log_prob, values)


def test_an_exact_tie_at_the_cut_takes_the_log_probability_of_the_kept_unit() -> None:
    """Noisy values 5, 5, 0: the mask's tie rule kept unit 1; a plain sort would price unit 0
    (the earlier position) and push the scorer toward a unit that was never kept."""
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    kept = torch.tensor([[False, True, False]])
    log_prob = _draw_log_prob(logits, torch.tensor([[5.0, 5.0, 0.0]]), kept, torch.tensor([1]))
    assert float(log_prob) == pytest.approx(float(1.0 - torch.logsumexp(logits[0], 0)))


def test_per_step_quotas_built_on_the_device_match_step_quotas() -> None:
    for steps, units, keep in [(2, 9, 0.3), (7, 36, 0.2), (5, 4, 0.77), (1, 4, 0.5)]:
        mask = retention_mask(torch.rand(steps, units), keep, "per_step")
        assert mask.sum(dim=1).tolist() == step_quotas(steps, units, keep)


def test_exploration_needs_a_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        sample_retention(torch.rand(3, 3), 0.5, temperature=0.0)
