"""M-RoPE positions carried as extra columns of media embeddings (vLLM's pruning format).

vLLM's pruning path ships each media item's positions through the encoder cache as float
columns appended to its embeddings. In bfloat16 an integer above 256 is no longer exact, so
each value travels as two base-256 digits, exact in any float dtype the model may use.
Channels: t, h, w, and the offset where text after the item resumes (relative to the item).
"""

from __future__ import annotations

import torch

_BASE = 256
POSITION_COLUMNS = 8
"""Columns appended per media token: (t, h, w, next-text offset) x (high, low) digits."""


def encode_positions(positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`[3, N]` (t, h, w) positions of one item -> `[N, 8]` columns in `like`'s dtype/device."""
    offset = positions.max() + 1 if positions.numel() else torch.tensor(0)
    channels = torch.cat([positions, offset.expand(1, positions.shape[1])]).T.long()  # [N, 4]
    largest = int(channels.max()) if channels.numel() else 0
    if largest >= _BASE * _BASE:
        raise ValueError(f"M-RoPE position {largest} exceeds {_BASE**2 - 1}")
    digits = torch.stack([channels // _BASE, channels % _BASE], dim=-1).reshape(-1, 8)
    return digits.to(device=like.device, dtype=like.dtype)


def decode_positions(columns: torch.Tensor) -> torch.Tensor:
    """`[N, 8]` columns -> `[4, N]` long (t, h, w, next-text offset), as vLLM's
    `recompute_mrope_positions` expects."""
    digits = columns.round().long().reshape(-1, 4, 2)
    return (digits[..., 0] * _BASE + digits[..., 1]).T
