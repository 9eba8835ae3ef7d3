"""Token scores: how much each LLM-token unit changed since the previous temporal step.

Shapes follow one convention: a video's units at the scoring block are `[T, U, m, D]`
(temporal steps, units per step, patches per unit, ViT width); scores are `[T, U]`.
High score = "changed, keep it".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class UnitAttentionPool(nn.Module):
    """Pools a unit's patches into one vector, with the unit mean as the query (paper §3).

    Attention pooling, not a plain mean, lets the scorer weigh the patch that moved.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches [..., m, D] -> [..., D]
        q = self.query(patches.mean(dim=-2, keepdim=True))  # [..., 1, D]
        k = self.key(patches)  # [..., m, D]
        weights = torch.softmax((q * k).sum(-1) * self.scale, dim=-1)  # [..., m]
        return (weights.unsqueeze(-1) * self.value(patches)).sum(dim=-2)


class STTSScorer(nn.Module):
    """The learned scorer: pool units, pair each with the same location one step earlier
    (zeros for the first step), 3-layer SiLU MLP, sigmoid."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.pool = UnitAttentionPool(dim)
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        # units [T, U, m, D] -> scores [T, U] in (0, 1)
        pooled = self.pool(units)  # [T, U, D]
        previous = torch.cat([torch.zeros_like(pooled[:1]), pooled[:-1]], dim=0)
        logits = self.mlp(torch.cat([previous, pooled], dim=-1)).squeeze(-1)
        return torch.sigmoid(logits.float())


def temporal_target(units: torch.Tensor) -> torch.Tensor:
    """`1 - cos(x[t-1, p], x[t, p])` over each unit's concatenated patch features.

    Returns `[T - 1, U]`: the first step has no predecessor and gets no target.
    """
    flat = units.flatten(start_dim=-2).float()  # [T, U, m*D]
    return 1.0 - F.cosine_similarity(flat[1:], flat[:-1], dim=-1)


def heuristic_scores(units: torch.Tensor) -> torch.Tensor:
    """The training-free scorer: the temporal target itself (first step scored 1, kept anyway)."""
    target = temporal_target(units)
    first = torch.ones_like(target[:1]) if target.shape[0] else units.new_ones(1, units.shape[1])
    return torch.cat([first.float(), target], dim=0)


def random_scores(units: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The random-pruning baseline: i.i.d. uniform scores (first step 1), reproducible for a
    given seed and video shape."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(units.shape[:2], generator=generator)
    scores[0] = 1.0
    return scores.to(units.device)


def score_units(units: torch.Tensor, kind: str, scorer: nn.Module | None) -> torch.Tensor:
    """`[T, U, m, D]` units -> `[T, U]` scores for a scorer kind (`STTSConfig.scorer`)."""
    if kind == "learned":
        if scorer is None:
            raise ValueError("the learned scorer needs its weights")
        # float32 always (the scorer's weights too): in bfloat16 about a third of the scores
        # tie, and ties change which units survive between training and serving. Autocast
        # (bfloat16 training) would run its matmuls in bfloat16 anyway: off here (serving
        # never autocasts, and its compiled towers never see this context).
        if torch.is_autocast_enabled(units.device.type):
            with torch.autocast(units.device.type, enabled=False):
                return scorer(units.float())
        return scorer(units.float())
    if kind == "heuristic":
        return heuristic_scores(units)
    if kind == "random":
        return random_scores(units)
    raise ValueError(f"unknown scorer kind {kind!r}")


def temporal_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The auxiliary loss: MSE between the scores of prunable steps (t >= 1) and the target."""
    if scores.shape[0] < 2:
        return scores.sum() * 0.0
    return F.mse_loss(scores[1:].float(), target.float())


def key_bias(scores: torch.Tensor, floor: float = -2.0, kind: str = "learned") -> torch.Tensor:
    """Scores -> the additive key bias of block `prune_at + 1`: `log` of the scores min-max
    rescaled per step into `[e^floor, 1]`; the first step (always kept) gets 0.

    This is how the LLM's gradient reaches the scorer: a low score mutes a unit's keys
    before it is dropped, so keeping the wrong unit costs loss.
    """
    if kind == "random":  # random pruning only drops units; it mutes nothing
        return torch.zeros_like(scores, dtype=torch.float32)
    lo = math.exp(floor)
    rest = scores[1:].float()
    mn = rest.amin(dim=-1, keepdim=True)
    span = rest.amax(dim=-1, keepdim=True) - mn
    unit = torch.where(span > 1e-12, (rest - mn) / span.clamp_min(1e-12), torch.ones_like(rest))
    bias = torch.log(lo + (1.0 - lo) * unit)
    return torch.cat([torch.zeros_like(scores[:1], dtype=bias.dtype), bias], dim=0)
