"""Which units survive. One count function serves the processor (placeholder count, before
the video is seen) and the model (mask size, after scoring), so the two always agree.

Two selections share that count: `global` (the paper: the first step whole, then a top-k over
all other steps) and `per_step` (the same total, split into a fixed quota per step, ranked
within each step). A prompt that names each step with its own timestamp (Qwen3-VL) must know
every step's token count before the ViT runs, which only `per_step` can promise.
"""

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


def step_quotas(num_steps: int, units_per_step: int, keep_ratio: float) -> list[int]:
    """Units each step keeps under `per_step` selection: the first step whole, the rest of
    `retained_count` split evenly over the other steps (earlier steps take the remainder).
    Sums to `retained_count`; no step exceeds `units_per_step`."""
    total = retained_count(num_steps, units_per_step, keep_ratio)
    if num_steps <= 1:
        return [total] * num_steps
    share, extra = divmod(total - units_per_step, num_steps - 1)
    return [units_per_step] + [share + (1 if i < extra else 0) for i in range(num_steps - 1)]


def retention_mask(
    scores: torch.Tensor, keep_ratio: float, selection: str = "global"
) -> torch.Tensor:
    """`[T, U]` scores -> `[T, U]` bool mask with `retained_count` units: the first step whole,
    then a top-k over the other steps (`global`) or within each of them (`per_step`); ties
    are broken by position (earlier first)."""
    num_steps, units_per_step = scores.shape
    mask = torch.zeros(num_steps, units_per_step, dtype=torch.bool, device=scores.device)
    mask[0] = True
    if selection == "global":
        extra = retained_count(num_steps, units_per_step, keep_ratio) - units_per_step
        if extra > 0:
            order = torch.argsort(scores[1:].reshape(-1), descending=True, stable=True)
            mask[1:].view(-1)[order[:extra]] = True
    elif selection == "per_step":
        quotas = step_quotas(num_steps, units_per_step, keep_ratio)[1:]
        if quotas:
            order = torch.argsort(scores[1:], dim=-1, descending=True, stable=True)
            ranks = torch.empty_like(order)
            ranks.scatter_(
                1, order, torch.arange(units_per_step, device=scores.device).expand_as(order)
            )
            quota = torch.tensor(quotas, device=scores.device).unsqueeze(-1)
            mask[1:] = ranks < quota
    else:
        raise ValueError(f"unknown selection {selection!r}; expected 'global' or 'per_step'")
    return mask
