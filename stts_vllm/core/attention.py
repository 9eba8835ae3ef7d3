"""The additive per-key bias of block `prune_at + 1`, as stock attention kernels can run it.

Adding `b_j` to every query's logit for key `j` is a rank-one change of the logits, so it fits
in one more channel of the queries and keys: with the kernel's softmax scale `s`,
`s * [q, 1] . [k, b / s] = s * q . k + b`. The channel is padded to `BIAS_CHANNELS` (flash
attention wants head sizes in multiples of 8; zeros add nothing) and the values get zeros
there, whose outputs are dropped. Any varlen kernel (SDPA on CPU, FlashAttention or FlashInfer
on GPU) then runs the biased block in one call for every window and video, with no mask
tensor and no host sync. `varlen_attention` runs it so on CUDA in half precision (the
training tower; FlashAttention varlen), and `grouped_sdpa`, the plain-SDPA path, elsewhere.
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
    # Divided in float32 at least, rounded once: in bfloat16 `b / s` is about 18 for b = -2.
    wide = key_bias.to(torch.promote_types(k.dtype, torch.float32))
    bias = (wide / scale).to(k.dtype).view(-1, 1, 1).expand(*k.shape[:-1], 1)
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

    On a GPU in half precision, one FlashAttention varlen call (`torch.nn.attention.varlen`)
    for every sequence, the key bias as one more channel: after pruning, a ViT's windows
    keep a few dozen different lengths, and one SDPA call per length can cost more on a GPU
    than the pruning saves (docs/benchmarks.md, the vision tower on a GPU). Elsewhere,
    sequences of one length run as one batched SDPA call: a few hundred short windows of a
    handful of lengths, where one call per sequence pays the per-call overhead hundreds of
    times per block (`bench/train_step.py`)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must run from 0 to {q.shape[0]}, got {bounds[0]}..{bounds[-1]}"
        )
    if q.shape[0] == 0:  # nothing to attend over
        return q.new_empty(*q.shape[:-1], v.shape[-1])
    lengths = {end - start for start, end in itertools.pairwise(bounds)} - {0}
    # One length (a dense tower's windows) is one batched SDPA call over a view, no gather:
    # faster than the varlen kernel on a GPU too (docs/benchmarks.md).
    if len(lengths) > 1 and flash_varlen_fits(q, k, v):
        return _flash_varlen(q, k, v, cu_seqlens, bounds, scale, key_bias)
    return grouped_sdpa(q, k, v, bounds, scale, key_bias)


def flash_varlen_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """FlashAttention's varlen kernel takes CUDA half-precision tensors with head sizes in
    multiples of 8 (the key-bias channel keeps them so); torch ships it with a `scale` from
    2.11 (the project pins 2.13)."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and all(x.shape[-1] % 8 == 0 for x in (q, k, v))
        and _varlen_attn() is not None
    )


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    bounds: list[int],
    scale: float | None,
    key_bias: torch.Tensor | None,
) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    width = v.shape[-1]
    if key_bias is not None:
        q, k, v = with_key_bias_channel(q, k, v, key_bias, scale)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = max(end - start for start, end in itertools.pairwise(bounds))
    varlen_attn = _varlen_attn()
    assert varlen_attn is not None
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale)
    return out[..., :width]


def grouped_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: list[int],
    scale: float | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SDPA path of `varlen_attention` (and its reference on a GPU): one batched call
    per sequence length."""
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
