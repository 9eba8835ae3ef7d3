"""Where kept units go in the ViT: its variable-length sequences (`cu_seqlens`, windows).

Vocabulary (Qwen2.5-VL geometry): a *unit* is one LLM token, the `m = merge²` patches the
merger pools together; a video item is a grid of `T x H x W` units (`H, W` in units, not
patches). Units are numbered in original order `t*H*W + y*W + x`. The ViT processes them in
*window order*: steps in order, inside a step square windows of `window x window` units in
row-major order, inside a window units row-major.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def window_partition(
    num_steps: int, units_h: int, units_w: int, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window order of one item's units, and the unit count of every window.

    Mirrors the stock padding exactly (it always pads, so an axis divisible by the window
    gets one extra, empty window row/column): returns `order` (unit ids in window order)
    and `sizes` (`[T * windows_per_step]`, empty windows included, as zeros). A tower
    without windows (`window=None`, Qwen3-VL) keeps original order, one window per step.
    """
    index = torch.arange(num_steps * units_h * units_w).reshape(num_steps, units_h, units_w)
    if window is None:
        return index.reshape(-1), torch.full((num_steps,), units_h * units_w)
    pad_h = window - units_h % window
    pad_w = window - units_w % window
    n_h = (units_h + pad_h) // window
    n_w = (units_w + pad_w) // window
    padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
    padded = padded.reshape(num_steps, n_h, window, n_w, window).permute(0, 1, 3, 2, 4)
    padded = padded.reshape(num_steps * n_h * n_w, window * window)
    sizes = (padded >= 0).sum(dim=1)
    flat = padded.reshape(-1)
    return flat[flat >= 0], sizes


def token_rows(unit_rows: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Unit indices -> the indices of their `unit_size` consecutive patch tokens."""
    offsets = torch.arange(unit_size, device=unit_rows.device)
    return (unit_rows.unsqueeze(-1) * unit_size + offsets).reshape(-1)


def _cumulative(counts: torch.Tensor, unit_size: int) -> torch.Tensor:
    counts = counts[counts > 0] * unit_size
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


@dataclass(frozen=True)
class PackedUnits:
    """A batch of items after pruning, ready for varlen attention with no padding.

    - `window_index`: all units (global ids) in window order, as the unpruned ViT orders them.
    - `kept_rows`: positions in that window order that survive (ascending).
    - `restore`: a permutation of the kept units, packed -> original order, so
      `merged[restore]` lists the kept units of every item in original order.
    - `cu_seqlens`: per temporal step, in patch tokens (empty steps dropped).
    - `cu_window_seqlens`: per window, in patch tokens (empty windows dropped).
    - `kept_per_item`: kept units per item, to split the merged output.
    """

    window_index: torch.Tensor
    kept_rows: torch.Tensor
    restore: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_window_seqlens: torch.Tensor
    kept_per_item: list[int]


def pack_kept_units(
    grids: Sequence[tuple[int, int, int]],
    keep_masks: Sequence[torch.Tensor | None],
    window: int | None,
    unit_size: int,
) -> PackedUnits:
    """Re-index the kept units of several items into packed variable-length sequences.

    `grids` are `(T, H, W)` in units; `keep_masks[i]` is a bool mask over item i's units in
    original order (`None` keeps all). Steps and windows keep their identity: attention
    after pruning is the unpruned attention restricted to kept keys and queries.
    """
    orders, window_ids, step_ids, keeps = [], [], [], []
    unit_offset = window_offset = step_offset = 0
    for (t, h, w), keep in zip(grids, keep_masks, strict=True):
        order, sizes = window_partition(t, h, w, window)
        wid = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
        windows_per_step = sizes.numel() // t
        orders.append(order + unit_offset)
        window_ids.append(wid + window_offset)
        step_ids.append(wid // windows_per_step + step_offset)
        if keep is None:
            keeps.append(torch.ones(order.numel(), dtype=torch.bool))
        else:
            keep = keep.reshape(-1).to(device="cpu", dtype=torch.bool)
            if keep.numel() != order.numel():
                raise ValueError(
                    f"keep mask has {keep.numel()} units, grid {t}x{h}x{w} has {order.numel()}"
                )
            keeps.append(keep[order])
        unit_offset += order.numel()
        window_offset += sizes.numel()
        step_offset += t

    window_index = torch.cat(orders)
    kept_window_order = torch.cat(keeps)
    kept_rows = kept_window_order.nonzero().squeeze(-1)
    restore = torch.argsort(window_index[kept_rows])
    window_counts = torch.bincount(torch.cat(window_ids)[kept_rows], minlength=window_offset)
    step_counts = torch.bincount(torch.cat(step_ids)[kept_rows], minlength=step_offset)
    return PackedUnits(
        window_index=window_index,
        kept_rows=kept_rows,
        restore=restore,
        cu_seqlens=_cumulative(step_counts, unit_size),
        cu_window_seqlens=_cumulative(window_counts, unit_size),
        kept_per_item=[int(k.sum()) for k in keeps],
    )


def budget_batches(sizes: Sequence[int], budget: int | None) -> list[list[int]]:
    """Items (by index, in order) grouped into consecutive batches whose sizes sum to at most
    `budget`; an item larger than the budget alone gets a batch of its own. `None`: one batch.

    A pruned tower's memory peaks in the blocks before the pruning point, where every patch
    is still there, so several videos encoded together are bounded by their *unpruned*
    patch count, not by the tokens they will keep."""
    if budget is not None and budget < 1:
        raise ValueError(f"budget must be positive or None, got {budget}")
    batches: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if batches and (budget is None or total + size <= budget):
            batches[-1].append(index)
            total += size
        else:
            batches.append([index])
            total = size
    return batches
