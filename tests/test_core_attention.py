"""The key bias as one more query/key channel equals attention with the bias added to every
key's logit (values, outputs and the bias's gradient), for any softmax scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stts_vllm.core import BIAS_CHANNELS, varlen_attention, with_key_bias_channel
from stts_vllm.core.attention import flash_varlen_fits, grouped_sdpa


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
    assert grouped_sdpa(q, k, v, [0, 0]).shape == (0, 2, 4)  # the GPU tests' reference too


def test_the_flash_varlen_kernel_is_for_cuda_half_precision_only() -> None:
    assert not flash_varlen_fits(*(torch.zeros(4, 2, 8, dtype=torch.bfloat16) for _ in "qkv"))
    if torch.cuda.is_available():
        cuda = [torch.zeros(4, 2, 8, device="cuda") for _ in "qkv"]
        assert not flash_varlen_fits(*cuda)  # float32: the grouped SDPA path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")
@pytest.mark.parametrize("biased", [False, True])
def test_flash_varlen_matches_float64_attention_on_pruned_windows(biased: bool) -> None:
    """What the pruned tower runs on a GPU: one FlashAttention varlen call over windows of
    many lengths (an empty one too), with the key-bias channel, gives float64 attention's
    values and gradients up to bfloat16 (errors relative to each tensor's largest entry, as
    the per-length SDPA gets them: a wrong scale or bias is off by its whole size)."""
    gen = torch.Generator().manual_seed(2)
    lengths = [int(n) for n in torch.randint(0, 65, (200,), generator=gen)] + [0, 64]
    total, heads, dim, scale = sum(lengths), 16, 80, 80**-0.5
    leaves = [
        torch.randn(total, heads, dim, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
        for _ in "qkv"
    ]
    bias = (-4 * torch.rand(total, generator=gen)).cuda().requires_grad_()
    exact = [x.detach().double().requires_grad_() for x in (*leaves, bias)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    assert flash_varlen_fits(*leaves)
    weights = torch.randn(total, heads, dim, generator=gen).cuda()

    def run(attend, inputs):
        out = attend(*inputs[:3], key_bias=inputs[3] if biased else None)
        used = inputs if biased else inputs[:3]
        return [out, *torch.autograd.grad((out.double() * weights).sum(), used)]

    half = [*leaves, bias]
    flash = run(lambda *x, **b: varlen_attention(*x, cu.cuda(), scale=scale, **b), half)
    grouped = run(lambda *x, **b: grouped_sdpa(*x, cu.tolist(), scale=scale, **b), half)
    reference = run(lambda *x, **b: grouped_sdpa(*x, cu.tolist(), scale=scale, **b), exact)
    names = ["out", "dq", "dk", "dv", "dbias"][: len(reference)]
    for name, ours, sdpa, ref in zip(names, flash, grouped, reference, strict=True):
        size = ref.abs().max()
        error, sdpa_error = ((x.double() - ref).abs().max() / size for x in (ours, sdpa))
        assert error < 3e-2, (name, float(error), float(sdpa_error))
