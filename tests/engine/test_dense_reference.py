"""The packed pruned ViT equals a dense masked reference.

The reference runs every token through every block of the same live vLLM tower, with stock
sequences and windows; pruning is expressed only as attention masks (the log-score bias at
block prune_at + 1, then pruned keys masked out), and the kept units are picked at the end.
Packing must change nothing but the cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from stts_vllm.core import heuristic_scores, key_bias, retention_mask
from stts_vllm.pruned_vision import pruned_vision_forward
from tests.engine.helpers import (
    ATOL,
    MASKED,
    assert_close_to_reference,
    live_model,
    same_choice_up_to_ties,
    segment_ids,
)

pytestmark = pytest.mark.float32_exact

# (T, h, w) in patches: odd unit grids, several windows, a 1-step video, a tiny frame
GRID_SETS = [
    [(4, 20, 28)],
    [(1, 12, 12)],
    [(3, 10, 18), (2, 6, 6), (5, 4, 22)],
    [(6, 2, 2)],
]


def _dense_block(blk: Any, x: torch.Tensor, segments: torch.Tensor, cos, sin, key_add) -> Any:
    """One vision block, written out: all tokens, a full [S, S] additive mask."""
    attn = blk.attn
    heads, head_dim = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
    qkv, _ = attn.qkv(blk.norm1(x))
    q, k, v = qkv.view(-1, 3, heads, head_dim).unbind(1)
    q, k = attn.apply_rotary_emb(torch.stack([q, k]).contiguous(), cos, sin).unbind(0)
    same = segments[:, None] == segments[None, :]
    mask = torch.where(same, key_add[None, :].expand_as(same), torch.tensor(MASKED))
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask[None],
        scale=head_dim**-0.5,
    ).transpose(0, 1)
    out, _ = attn.proj(out.reshape(x.shape[0], 1, -1))
    normed, residual = blk.norm2(x, residual=out)
    return residual + blk.mlp(normed)


def dense_reference(
    model: Any, pixels: torch.Tensor, grids: list, keeps: list[float], kept: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of the `kept` units, plus the reference's own masks and scores (to check that
    it would choose the same units, up to float near-ties)."""
    visual, config = model.visual, model.stts_config
    m, dim = visual.spatial_merge_unit, visual.hidden_size
    meta = visual.prepare_encoder_metadata(grids)
    order, reverse = meta["window_index"], meta["reverse_indices"]
    x = visual.patch_embed(visual.input_norm(pixels, visual.dtype))
    x = x.view(-1, m, dim)[order].reshape(-1, 1, dim)
    segments = {
        "full": segment_ids(meta["cu_seqlens"], x.shape[0]),
        "window": segment_ids(meta["cu_window_seqlens"], x.shape[0]),
    }
    key_add = torch.zeros(x.shape[0], device=x.device)
    masks: list[torch.Tensor] = []
    all_scores: list[torch.Tensor] = []
    for index, blk in enumerate(visual.blocks):
        if index == config.prune_at + 1:
            units = x.view(-1, m, dim)[reverse]
            biases, offset = [], 0
            for (t, h, w), keep in zip(grids, keeps, strict=True):
                n = t * (h // 2) * (w // 2)
                item = units[offset : offset + n].view(t, n // t, m, dim)
                scores = (
                    model.stts_scorer(item)
                    if model.stts_scorer is not None
                    else heuristic_scores(item)
                )
                masks.append(retention_mask(scores, keep).reshape(-1))
                all_scores.append(scores.reshape(-1))
                biases.append(key_bias(scores, config.bias_floor).reshape(-1))
                offset += n
            key_add = torch.cat(biases)[order].repeat_interleave(m)
        elif index == config.prune_at + 2:
            kept_patches = torch.cat(kept)[order].repeat_interleave(m)
            key_add = torch.where(kept_patches, 0.0, MASKED)
        kind = "full" if index in visual.fullatt_block_indexes else "window"
        x = _dense_block(
            blk, x, segments[kind], meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"], key_add
        )
    merged = visual.merger(x)[reverse]
    sizes = [t * (h // 2) * (w // 2) for t, h, w in grids]
    outputs = [item[mask] for item, mask in zip(merged.split(sizes), kept, strict=True)]
    return outputs, masks, all_scores


def _pixels(grids: list, seed: int) -> torch.Tensor:
    """Patch rows in processor order (step, unit, patch). Every unit changes between steps
    by its own amplitude (a permutation of evenly spaced levels): scores spread out with no
    near-ties, so both paths pick the same units whatever their float rounding."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for t, h, w in grids:
        units = (h // 2) * (w // 2)
        base = torch.randn(1, units, 4, 3 * 2 * 14 * 14, generator=gen)
        noise = torch.randn(t, units, 4, base.shape[-1], generator=gen)
        amplitude = (torch.randperm(units, generator=gen) + 1).float() / units
        frames = base + amplitude.view(1, -1, 1, 1) * noise
        items.append(frames.reshape(-1, base.shape[-1]))
    return torch.cat(items)


@pytest.fixture(scope="module", params=["heuristic", "learned", "deep"])
def model(
    request: pytest.FixtureRequest, engines, demo_ckpt: Path, learned_ckpt: Path, deep_ckpt: Path
) -> Any:
    """Between them: biased window and full-attention blocks, packed window and full ones."""
    ckpt = {"heuristic": demo_ckpt, "learned": learned_ckpt, "deep": deep_ckpt}[request.param]
    return live_model(engines.get(ckpt))


@pytest.mark.parametrize(
    "grids", GRID_SETS, ids=lambda g: "+".join("x".join(map(str, x)) for x in g)
)
@pytest.mark.parametrize("keep", [0.5, 0.3])
@torch.inference_mode()
def test_packed_equals_dense_masked_reference(model: Any, grids: list, keep: float) -> None:
    keeps = [keep] * len(grids)
    pixels = _pixels(grids, seed=len(grids)).to(model.visual.device)
    packed = pruned_vision_forward(
        model.visual, pixels, grids, keeps, config=model.stts_config, scorer=model.stts_scorer
    )
    masks = [m for m in packed.keep_masks if m is not None]
    assert len(masks) == len(grids)
    reference, reference_masks, scores = dense_reference(model, pixels, grids, keeps, masks)
    for ours, ref, mask, ref_mask, item_scores, (_t, h, w) in zip(
        packed.embeds, reference, masks, reference_masks, scores, grids, strict=True
    ):
        assert same_choice_up_to_ties(mask, ref_mask, item_scores, (h // 2) * (w // 2))
        assert_close_to_reference(ours, ref)


@torch.inference_mode()
def test_keep_one_items_on_the_pruned_path_are_stock(model: Any) -> None:
    """A batch mixing keep 1.0 and 0.5 items: the 1.0 item equals the stock tower's output."""
    grids = [(4, 12, 16), (2, 8, 8)]
    pixels = _pixels(grids, seed=7).to(model.visual.device)
    packed = pruned_vision_forward(
        model.visual, pixels, grids, [1.0, 0.5], config=model.stts_config, scorer=model.stts_scorer
    )
    stock = model.visual(pixels[: 4 * 12 * 16], grid_thw=[[4, 12, 16]])
    assert packed.keep_masks[0] is None
    torch.testing.assert_close(packed.embeds[0], stock, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_key_bias_changes_the_output_well_beyond_tolerance(model: Any) -> None:
    """Guards the comparison above: a pruned tower that skipped the bias must fail it."""
    import dataclasses

    grids = [(4, 20, 28)]
    pixels = _pixels(grids, seed=1).to(model.visual.device)
    flat = dataclasses.replace(model.stts_config, bias_floor=-1e-9)  # bias ~ 0 everywhere
    with_bias, without_bias = (
        pruned_vision_forward(
            model.visual, pixels, grids, [0.5], config=c, scorer=model.stts_scorer
        )
        for c in (model.stts_config, flat)
    )
    assert torch.equal(with_bias.keep_masks[0], without_bias.keep_masks[0])
    effect = (with_bias.embeds[0] - without_bias.embeds[0]).abs().max()
    assert effect > 20 * ATOL
