"""Which units survive. One count function serves the processor (placeholder count, before
the video is seen) and the model (mask size, after scoring), so the two always agree."""

from __future__ import annotations

import math

import torch

from stts_vllm.core.config import check_keep_ratio


def retained_count(num_steps: int, units_per_step: int, keep_ratio: float) -> int:
    """Units a video keeps: `round(keep * T * U)` (half up), never fewer than one whole step
    (the first step is always kept) and never more than all."""
    keep_ratio = check_keep_ratio(keep_ratio, "keep_ratio")
    total = num_steps * units_per_step
    wanted = math.floor(keep_ratio * total + 0.5)
    return min(total, max(units_per_step, wanted))


def retention_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """`[T, U]` scores -> `[T, U]` bool mask: the first step whole, then a global top-k over
    the other steps (not per frame), ties broken by position (earlier first)."""
    num_steps, units_per_step = scores.shape
    count = retained_count(num_steps, units_per_step, keep_ratio)
    mask = torch.zeros(num_steps, units_per_step, dtype=torch.bool, device=scores.device)
    mask[0] = True
    extra = count - units_per_step
    if extra > 0:
        order = torch.argsort(scores[1:].reshape(-1), descending=True, stable=True)
        mask[1:].view(-1)[order[:extra]] = True
    return mask
