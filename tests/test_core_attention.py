"""The key bias as one more query/key channel equals attention with the bias added to every
key's logit (values, outputs and the bias's gradient), for any softmax scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stts_vllm.core import BIAS_CHANNELS, varlen_attention, with_key_bias_channel


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain attention over one sequence, `[S, heads, dim]`, no mask."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("scale", [80**-0.5, 0.3])
def test_bias_channel_equals_biased_attention(scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    seq, heads, dim = 37, 3, 16
    q, k, v = (torch.randn(seq, heads, dim, generator=gen, dtype=torch.float64) for _ in "qkv")
    bias = (-6 * torch.rand(seq, generator=gen, dtype=torch.float64)).requires_grad_()
    q2, k2, v2 = with_key_bias_channel(q, k, v, bias, scale)
    assert q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == dim + BIAS_CHANNELS
    ours = _sdpa(q2, k2, v2, scale)[..., :dim]
    reference = varlen_attention(q, k, v, torch.tensor([0, seq]), scale=scale, key_bias=bias)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), bias)
    (grad_ref,) = torch.autograd.grad(reference.square().sum(), bias)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-9, atol=1e-10)
    # and the bias really matters: without it the answer is far off
    assert (ours - _sdpa(q, k, v, scale)).abs().max() > 1e-2


def test_bias_channel_keeps_leading_dimensions() -> None:
    q = k = v = torch.randn(1, 9, 2, 8)
    q2, k2, v2 = with_key_bias_channel(q, k, v, torch.zeros(9), 0.5)
    assert q2.shape == k2.shape == v2.shape == (1, 9, 2, 8 + BIAS_CHANNELS)
    assert torch.equal(k2[..., 8], torch.zeros(1, 9, 2))  # zero bias: an all-zero channel


@pytest.mark.parametrize("lengths", [[5, 9, 0, 5, 3, 9, 9], [16, 16, 16], [11]])
@pytest.mark.parametrize("biased", [False, True])
def test_varlen_attention_is_block_diagonal_attention(lengths: list[int], biased: bool) -> None:
    """Sequences batched by length (and the one-length view) give what one attention call
    with a block-diagonal mask gives, values and gradients, in the packed order."""
    gen = torch.Generator().manual_seed(1)
    total, heads, dim, scale = sum(lengths), 2, 8, 0.4
    q, k, v = (
        torch.randn(total, heads, dim, generator=gen, dtype=torch.float64).requires_grad_()
        for _ in "qkv"
    )
    bias = (-4 * torch.rand(total, generator=gen, dtype=torch.float64)).requires_grad_()
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = torch.where(seq[:, None] == seq[None, :], 0.0, float("-inf")).to(torch.float64)
    if biased:
        mask = mask + bias[None, :]
    reference = F.scaled_dot_product_attention(
        *(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask, scale=scale
    ).transpose(0, 1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ours = varlen_attention(q, k, v, cu, scale=scale, key_bias=bias if biased else None)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    inputs = (q, k, v, bias) if biased else (q, k, v)
    weights = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad((ours * weights).sum(), inputs),
        torch.autograd.grad((reference * weights).sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_varlen_attention_of_nothing_is_empty() -> None:
    q = k = torch.zeros(0, 2, 8)
    v = torch.zeros(0, 2, 4)
    assert varlen_attention(q, k, v, torch.tensor([0, 0])).shape == (0, 2, 4)
