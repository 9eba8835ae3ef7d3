"""Where kept units go: the ViT's variable-length sequences and the LLM's M-RoPE grid.

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


def mrope_time_factor(seconds_per_step: float, tokens_per_second: float) -> float:
    """M-RoPE time positions per temporal step, as serving computes it: the processor hands
    `second_per_grid_ts` (= temporal patch / fps) over as a float32 tensor, and the position
    code multiplies that float32 value by `tokens_per_second`. Training must use the same
    rounding, or at some frame rates (e.g. 25 fps) a step lands one position off."""
    rounded = float(torch.tensor(float(seconds_per_step), dtype=torch.float32))
    return rounded * float(tokens_per_second)


def mrope_positions(num_steps: int, units_h: int, units_w: int, t_factor: float) -> torch.Tensor:
    """`[3, T*H*W]` (t, h, w) M-RoPE positions of every unit, in original order, relative to
    the media start. `t = floor(step * t_factor)` in float64, exactly as the stock Qwen2.5-VL
    position code computes it (`t_factor` = seconds per step x tokens per second)."""
    t = (torch.arange(num_steps, dtype=torch.float64) * float(t_factor)).long()
    grid_t = t.view(-1, 1, 1).expand(num_steps, units_h, units_w)
    grid_h = torch.arange(units_h).view(1, -1, 1).expand(num_steps, units_h, units_w)
    grid_w = torch.arange(units_w).view(1, 1, -1).expand(num_steps, units_h, units_w)
    return torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1)


def step_positions(units_h: int, units_w: int) -> torch.Tensor:
    """`[3, H*W]` `(0, y, x)`: the M-RoPE positions of one Qwen3-VL temporal step (or image)
    relative to the token after its vision start; time lives in the text timestamps."""
    grid = torch.stack(
        torch.meshgrid(torch.arange(units_h), torch.arange(units_w), indexing="ij")
    ).reshape(2, -1)
    return torch.cat([torch.zeros_like(grid[:1]), grid])


def timestamped_video_positions(
    tokens: Sequence[int],
    units_h: int,
    units_w: int,
    next_position: int,
    *,
    video_token: int,
    vision_start: int,
    vision_end: int,
    keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """`[3, len(tokens)]` M-RoPE positions of a Qwen3-VL video's prompt span (`<t seconds>`
    `<|vision_start|>` + a step's video tokens + `<|vision_end|>`, per step), for any per-step
    token counts, and the position after it. Text advances one by one; a step's video tokens
    take `(0, y, x)` after its vision start: of the kept units when `keep_mask` (`[T * H * W]`,
    original order) is given, else the stock grid's first ones (placeholders until the kept
    units are known); the step's vision end sits where the unpruned step ends,
    `start + max(H, W)`, however many tokens the step kept."""
    step = step_positions(units_h, units_w)
    units = torch.arange(units_h * units_w)
    kept_units = (
        None
        if keep_mask is None
        else [units[m] for m in keep_mask.reshape(-1, units_h * units_w).cpu()]
    )
    index = -1
    span = max(units_h, units_w)
    positions = torch.empty(3, len(tokens), dtype=torch.long)
    base = kept = 0
    in_step = False
    for i, token in enumerate(tokens):
        if token == video_token:
            unit = kept if kept_units is None else int(kept_units[index][kept])
            positions[:, i] = step[:, unit] + base
            kept += 1
        elif token == vision_end and in_step:
            positions[:, i] = base + span
            next_position = base + span + 1
            in_step = False
        else:
            positions[:, i] = next_position
            next_position += 1
            if token == vision_start:
                base, kept, in_step, index = next_position, 0, True, index + 1
    return positions, next_position
