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
    `key_bias`: `[S]`, added to every query's logit for that key. Returns `[S, heads, dim]`.

    Sequences of one length run as one batched SDPA call: a ViT's windows are a few hundred
    short sequences of a handful of lengths, and one call per sequence pays the per-call
    overhead hundreds of times per block, forward and backward (`bench/train_step.py`)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must run from 0 to {q.shape[0]}, got {bounds[0]}..{bounds[-1]}"
        )
    starts: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            starts.setdefault(end - start, []).append(start)
    bias = None if key_bias is None else key_bias.to(q.dtype)
    if not starts:  # nothing to attend over
        return q.new_empty(*q.shape[:-1], v.shape[-1])
    if len(starts) == 1:  # one length (a dense tower's windows): a view, no gather
        ((length, group),) = starts.items()
        return _batched(q, k, v, None, len(group), length, bias, scale).flatten(0, 1)
    rows, outs = [], []
    for length, group in starts.items():
        index = (torch.tensor(group)[:, None] + torch.arange(length)).flatten().to(q.device)
        outs.append(_batched(q, k, v, index, len(group), length, bias, scale).flatten(0, 1))
        rows.append(index)
    # Back to the packed order: every row is in exactly one group.
    return torch.cat(outs)[torch.argsort(torch.cat(rows))]


def _batched(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor | None,
    count: int,
    length: int,
    bias: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Attention over `count` sequences of `length` rows each (rows `index`, or all of them
    in order): `[count, length, heads, dim]`."""

    def take(x: torch.Tensor) -> torch.Tensor:
        x = x if index is None else x[index]
        return x.reshape(count, length, *x.shape[1:])

    mask = None if bias is None else take(bias).view(count, 1, 1, length)
    out = F.scaled_dot_product_attention(
        *(take(x).transpose(1, 2) for x in (q, k, v)), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)
