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
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must run from 0 to {q.shape[0]}, got {bounds[0]}..{bounds[-1]}"
        )
    # split/cat rather than slicing: their backward is one concatenation, where slices would
    # each scatter into a zero-filled full-size gradient (quadratic in the segment count).
    lengths = [end - start for start, end in itertools.pairwise(bounds)]
    biases = [None] * len(lengths) if key_bias is None else key_bias.to(q.dtype).split(lengths)
    outs = []
    splits = (q.split(lengths), k.split(lengths), v.split(lengths), biases)
    for qs, ks, vs, bias in zip(*splits, strict=True):
        if qs.shape[0] == 0:
            outs.append(qs)
            continue
        mask = None if bias is None else bias.view(1, 1, -1)
        out = F.scaled_dot_product_attention(
            qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), attn_mask=mask, scale=scale
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)
