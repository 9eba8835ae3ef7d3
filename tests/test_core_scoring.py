"""Scorer, temporal target, auxiliary loss, key bias."""

import math

import torch

from stts_vllm.core import STTSScorer, heuristic_scores, key_bias, temporal_loss, temporal_target


def _units(steps: int = 4, units: int = 6, m: int = 4, dim: int = 8) -> torch.Tensor:
    return torch.randn(steps, units, m, dim, generator=torch.Generator().manual_seed(1))


def test_temporal_target_is_one_minus_cosine_of_concatenated_patches() -> None:
    units = _units()
    target = temporal_target(units)
    assert target.shape == (3, 6)
    a, b = units[1, 2].reshape(-1), units[2, 2].reshape(-1)
    expected = 1 - torch.dot(a, b) / (a.norm() * b.norm())
    assert torch.allclose(target[1, 2], expected, atol=1e-6)


def test_static_units_score_zero_and_changed_units_score_high() -> None:
    units = _units().clone()
    units[1:, 0] = units[0, 0]  # unit 0 never changes
    scores = heuristic_scores(units)
    assert torch.allclose(scores[1:, 0], torch.zeros(3), atol=1e-6)
    assert bool((scores[1:, 1:] > 0.1).all())
    assert scores[0].tolist() == [1.0] * 6


def test_one_step_video_scores() -> None:
    assert heuristic_scores(_units(steps=1)).shape == (1, 6)
    scorer = STTSScorer(dim=8, hidden=16)
    scores = scorer(_units(steps=1))
    assert scores.shape == (1, 6)
    assert float(temporal_loss(scores, temporal_target(_units(steps=1)))) == 0.0


def test_learned_scorer_pairs_each_step_with_the_previous_one() -> None:
    torch.manual_seed(0)
    scorer = STTSScorer(dim=8, hidden=16)
    units = _units()
    scores = scorer(units)
    assert scores.shape == (4, 6) and bool(((scores > 0) & (scores < 1)).all())
    changed = units.clone()
    changed[1] += 1.0  # step 1 changes: scores of steps 1 and 2 (its successor) move
    delta = (scorer(changed) - scores).abs().amax(dim=1)
    assert delta[0] == 0 and delta[3] == 0 and delta[1] > 0 and delta[2] > 0


def test_scorer_learns_the_temporal_target() -> None:
    torch.manual_seed(0)
    scorer = STTSScorer(dim=8, hidden=32)
    opt = torch.optim.Adam(scorer.parameters(), lr=1e-2)
    units = _units(steps=6, units=10)
    units[2:, :5] = units[1, :5]  # half the locations freeze after step 1
    target = temporal_target(units)
    first = float(temporal_loss(scorer(units), target))
    for _ in range(150):
        opt.zero_grad()
        loss = temporal_loss(scorer(units), target)
        loss.backward()
        opt.step()
    assert float(loss) < first / 5


def test_key_bias_range_and_first_step() -> None:
    scores = torch.tensor([[0.3, 0.9, 0.1], [0.2, 0.6, 1.0], [0.5, 0.5, 0.5]])
    bias = key_bias(scores, floor=-2.0)
    assert bias[0].tolist() == [0.0, 0.0, 0.0]  # first step: score forced to 1
    assert math.isclose(float(bias[1].min()), -2.0, abs_tol=1e-6)  # per-step min -> e^-2
    assert math.isclose(float(bias[1].max()), 0.0, abs_tol=1e-6)  # per-step max -> 1
    assert bias[2].tolist() == [0.0, 0.0, 0.0]  # a flat step gets no bias


def test_key_bias_passes_gradient_to_scores() -> None:
    scores = torch.rand(3, 5, requires_grad=True)
    key_bias(scores).sum().backward()
    assert scores.grad is not None and bool(scores.grad[1:].abs().sum() > 0)


def test_random_scores_are_reproducible_and_mute_nothing() -> None:
    """The random-pruning baseline: same video shape, same choice; the first step is kept;
    no key bias (random pruning only drops units)."""
    from stts_vllm.core import key_bias, random_scores, retention_mask, score_units

    units = _units(steps=4)
    a, b = random_scores(units), score_units(units, "random", None)
    assert torch.equal(a, b) and bool((a[0] == 1.0).all())
    assert bool(retention_mask(a, 0.5)[0].all())
    assert torch.count_nonzero(key_bias(a, -2.0, "random")) == 0
    assert torch.count_nonzero(key_bias(a, -2.0, "heuristic")) > 0
