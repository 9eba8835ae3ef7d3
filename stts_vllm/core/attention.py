"""The additive per-key bias of block `prune_at + 1`, as stock attention kernels can run it.

Adding `b_j` to every query's logit for key `j` is a rank-one change of the logits, so it fits
in one more channel of the queries and keys: with the kernel's softmax scale `s`,
`s * [q, 1] . [k, b / s] = s * q . k + b`. The channel is padded to `BIAS_CHANNELS` (flash
attention wants head sizes in multiples of 8; zeros add nothing) and the values get zeros
there, whose outputs are dropped. Any varlen kernel (SDPA on CPU, FlashAttention or FlashInfer
on GPU) then runs the biased block in one call for every window and video, with no mask
tensor and no host sync. `varlen_attention` is the plain-SDPA reference it is tested against.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

BIAS_CHANNELS = 8


def with_key_bias_channel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`q, k, v`: `[..., S, heads, head_dim]`; `key_bias`: `[S]`. Returns them with
    `BIAS_CHANNELS` more channels such that attention with softmax scale `scale` over the
    result, cut back to `head_dim` output channels, equals biased attention over the inputs.
    Differentiable in `key_bias` (training takes the scorer's gradient through it)."""
    lead = q.shape[:-1]
    bias = (key_bias.to(k.dtype) / scale).view(-1, 1, 1).expand(*k.shape[:-1], 1)
    pad = BIAS_CHANNELS - 1
    q = torch.cat([q, q.new_ones(*lead, 1), q.new_zeros(*lead, pad)], dim=-1)
    k = torch.cat([k, bias, k.new_zeros(*k.shape[:-1], pad)], dim=-1)
    v = torch.cat([v, v.new_zeros(*v.shape[:-1], BIAS_CHANNELS)], dim=-1)
    return q, k, v


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
