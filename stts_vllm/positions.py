"""M-RoPE positions carried as extra columns of media embeddings (vLLM's pruning format).

vLLM's pruning path ships each media item's positions through the encoder cache as float
columns appended to its embeddings. In bfloat16 an integer above 256 is no longer exact, so
each value travels as three base-256 digits, exact in any float dtype the model may use.
Channels: t, h, w, and the offset where text after the item resumes (relative to the item).
"""

from __future__ import annotations

import torch

_BASE = 256
_DIGITS = 3
POSITION_LIMIT = _BASE**_DIGITS
"""Positions must stay below this; the processor refuses media that would not."""
POSITION_COLUMNS = 4 * _DIGITS
"""Columns appended per media token: (t, h, w, next-text offset) x base-256 digits."""


def encode_positions(positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`[3, N]` (t, h, w) positions of one item -> `[N, 12]` columns in `like`'s dtype/device."""
    offset = positions.max() + 1 if positions.numel() else torch.tensor(0)
    channels = torch.cat([positions, offset.expand(1, positions.shape[1])]).T.long()  # [N, 4]
    channels = channels.clamp(0, POSITION_LIMIT - 1)  # the processor keeps inputs below it
    digits = [(channels // _BASE**k) % _BASE for k in reversed(range(_DIGITS))]
    return torch.stack(digits, dim=-1).reshape(-1, POSITION_COLUMNS).to(like.device, like.dtype)


def decode_positions(columns: torch.Tensor) -> torch.Tensor:
    """`[N, 12]` columns -> `[4, N]` long (t, h, w, next-text offset)."""
    digits = columns.round().long().reshape(-1, 4, _DIGITS)
    value = torch.zeros_like(digits[..., 0])
    for k in range(_DIGITS):
        value = value * _BASE + digits[..., k]
    return value.T


def media_runs(media: torch.Tensor) -> list[tuple[int, int]]:
    """`[start, end)` of each run of media placeholder tokens; one run per media item (items
    are always separated by their vision start/end tokens)."""
    flags = media.to(torch.int8)
    edges = torch.diff(flags, prepend=flags.new_zeros(1), append=flags.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends, strict=True))


def place_media_positions(
    media: torch.Tensor,
    media_positions: list[torch.Tensor],
    positions: torch.Tensor,
    num_computed_tokens: int,
) -> torch.Tensor:
    """Write kept media tokens' own positions into a prompt's `[3, N]` M-RoPE positions.

    `media` flags the prompt's placeholder tokens; `media_positions[i]` (`[4, n_i]`, decoded
    columns) is the i-th media slice the runner scheduled in this chunk, in prompt order, so
    together they cover the media tokens from `num_computed_tokens` on (the first possibly
    entered mid-way). A run of placeholder tokens is one item (Qwen2.5-VL) or one temporal
    step of an item (Qwen3-VL): either way each token's carried position is relative to the
    token after its run's vision start. Text positions are already exact, so only
    placeholder columns change. Works for any chunking of the prompt.
    """
    out = positions.clone()
    carried = torch.cat(media_positions, dim=1) if media_positions else positions.new_zeros(4, 0)
    done = 0
    for start, end in media_runs(media):
        if end <= num_computed_tokens or done == carried.shape[1]:
            continue
        first = max(start, num_computed_tokens)
        count = min(end - first, carried.shape[1] - done)
        base = out[0, start - 1] + 1 if start > 0 else out.new_zeros(())
        out[:, first : first + count] = carried[:3, done : done + count].to(out.device) + base
        done += count
    if done != carried.shape[1]:
        raise ValueError(
            f"media slices of {carried.shape[1]} tokens: more than the {done} placeholder tokens "
            f"from {num_computed_tokens} on (a slice overruns its placeholder)"
        )
    return out
