"""Where kept units go in the LLM: M-RoPE positions, exactly as vLLM's stock models place them.

A media item's tokens take `(t, h, w)` positions relative to the position after the text
before it, and the text after it resumes past the *unpruned* item, however many units were
kept: so a kept unit sits where it would have sat in the stock model. Qwen2.5-VL puts time in
`t` (`mrope_positions`); Qwen3-VL puts it in `<t seconds>` text before each temporal step and
places a step's units at `(0, y, x)` (`step_positions`, `timestamped_video_positions`).
`prompt_mrope_positions` is the walk over a prompt's text and media runs, written once for
every family and for training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Placement = tuple[torch.Tensor, int]
"""A media item's `[3, n]` token positions and the position where the text after it resumes."""


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


def grid_placement(
    grid: torch.Tensor, start: int, kept: torch.Tensor | slice = slice(None)
) -> Placement:
    """A media item placed from `start`: `grid` (`[3, N]`, every unit, original order,
    relative) at the `kept` columns (a mask of kept units, or the first `n` as placeholders
    until the kept units are known); text resumes past the unpruned item."""
    return grid[:, kept] + start, start + int(grid.max()) + 1


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
) -> Placement:
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


def prompt_mrope_positions(
    num_tokens: int,
    media: Sequence[tuple[int, int]],
    place: Callable[[int, int], Placement],
) -> tuple[torch.Tensor, int]:
    """`[3, num_tokens]` M-RoPE positions of a prompt, and vLLM's position delta (the
    position after the last one minus `num_tokens`).

    `media`: each media run's `(offset, length)` in the prompt, in prompt order;
    `place(i, start)` places run `i` from `start`, the position after the text before it
    (`grid_placement`, `timestamped_video_positions`). Text advances one by one."""
    columns: list[torch.Tensor] = []
    consumed = next_position = 0
    for i, (offset, length) in enumerate(media):
        text_len = offset - consumed
        columns.append(torch.arange(text_len).expand(3, -1) + next_position)
        item, next_position = place(i, next_position + text_len)
        columns.append(item)
        consumed = offset + length
    tail = num_tokens - consumed
    columns.append(torch.arange(tail).expand(3, -1) + next_position)
    positions = torch.cat(columns, dim=1)
    delta = int(positions.max()) + 1 - num_tokens if positions.numel() else 0
    return positions, delta
