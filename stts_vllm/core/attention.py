"""Variable-length attention with an additive per-key bias, for block `prune_at + 1`.

Stock ViT kernels take no bias; this one block runs plain SDPA per sequence instead.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`q, k, v`: `[S, heads, head_dim]` packed sequences delimited by `cu_seqlens`;
    `key_bias`: `[S]`, added to every query's logit for that key. Returns `[S, heads, dim]`."""
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q)
    for start, end in itertools.pairwise(bounds):
        if end <= start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [heads, s, dim]
        mask = None if key_bias is None else key_bias[start:end].to(q.dtype).view(1, 1, -1)
        out[start:end] = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=scale
        ).transpose(0, 1)
    return out
