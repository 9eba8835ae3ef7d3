"""The packed pruned Qwen3-VL tower, deepstack features included, equals a dense masked
reference.

The reference runs every token through every block of the same live vLLM tower with stock
sequences (one per temporal step); pruning is expressed only as attention masks (the
log-score bias at block prune_at + 1, then pruned keys masked out); the main merger and every
deepstack merger run on all units, and the kept units are picked at the end. Whatever a
deepstack tap's block index is relative to the pruning point, packing changes nothing but
the cost.
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
    MASKED,
    assert_close_to_reference,
    live_model,
    same_choice_up_to_ties,
    segment_ids,
)

pytestmark = pytest.mark.float32_exact

# (T, h, w) in patches (16 px): odd unit grids, a 1-step video, several items
GRID_SETS = [[(4, 10, 14)], [(1, 8, 8)], [(3, 6, 10), (2, 4, 4), (5, 2, 12)]]


def _dense_block(blk: Any, x: torch.Tensor, segments: torch.Tensor, cos, sin, key_add) -> Any:
    """One Qwen3 vision block, written out: all tokens, a full [S, S] additive mask."""
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
    x = x + out
    return x + blk.mlp(blk.norm2(x))


def dense_reference(
    model: Any, pixels: torch.Tensor, grids: list, keeps: list[float], kept: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    visual, config = model.visual, model.stts_config
    m, dim = visual.spatial_merge_unit, visual.hidden_size
    meta = visual.prepare_encoder_metadata(grids)
    x = visual.patch_embed(visual.input_norm(pixels, visual.dtype)) + meta["pos_embeds"]
    x = x.unsqueeze(1)
    segments = segment_ids(meta["cu_seqlens"], x.shape[0])
    key_add = torch.zeros(x.shape[0], device=x.device)
    masks: list[torch.Tensor] = []
    all_scores: list[torch.Tensor] = []
    taps: list[torch.Tensor] = []
    for index, blk in enumerate(visual.blocks):
        if index == config.prune_at + 1:
            units = x.view(-1, m, dim)
            biases, offset = [], 0
            for (t, h, w), keep in zip(grids, keeps, strict=True):
                n = t * (h // 2) * (w // 2)
                item = units[offset : offset + n].view(t, n // t, m, dim)
                scores = (
                    model.stts_scorer(item.float())
                    if model.stts_scorer is not None
                    else heuristic_scores(item)
                )
                masks.append(retention_mask(scores, keep, config.selection).reshape(-1))
                all_scores.append(scores.reshape(-1))
                biases.append(key_bias(scores, config.bias_floor).reshape(-1))
                offset += n
            key_add = torch.cat(biases).repeat_interleave(m)
        elif index == config.prune_at + 2:
            key_add = torch.where(torch.cat(kept).repeat_interleave(m), 0.0, MASKED)
        x = _dense_block(
            blk, x, segments, meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"], key_add
        )
        if index in visual.deepstack_visual_indexes:
            position = visual.deepstack_visual_indexes.index(index)
            taps.append(visual.deepstack_merger_list[position](x))
    merged = torch.cat([visual.merger(x), *taps], dim=1)
    sizes = [t * (h // 2) * (w // 2) for t, h, w in grids]
    outputs = [item[mask] for item, mask in zip(merged.split(sizes), kept, strict=True)]
    return outputs, masks, all_scores


def _pixels(grids: list, seed: int, patch: int = 16) -> torch.Tensor:
    """As the Qwen2.5-VL test's `_pixels`: every unit changes by its own amplitude, so both
    paths pick the same units whatever their float rounding."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for t, h, w in grids:
        units = (h // 2) * (w // 2)
        base = torch.randn(1, units, 4, 3 * 2 * patch * patch, generator=gen)
        noise = torch.randn(t, units, 4, base.shape[-1], generator=gen)
        amplitude = (torch.randperm(units, generator=gen) + 1).float() / units
        items.append((base + amplitude.view(1, -1, 1, 1) * noise).reshape(-1, base.shape[-1]))
    return torch.cat(items)


@pytest.fixture(scope="module", params=["taps-before-and-after", "learned-tap-on-bias", "deep"])
def model(
    request: pytest.FixtureRequest,
    engines,
    qwen3_ckpt: Path,
    qwen3_learned_ckpt: Path,
    qwen3_deep_ckpt: Path,
) -> Any:
    ckpt = {
        "taps-before-and-after": qwen3_ckpt,
        "learned-tap-on-bias": qwen3_learned_ckpt,
        "deep": qwen3_deep_ckpt,
    }[request.param]
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
        model.visual,
        pixels,
        grids,
        keeps,
        config=model.stts_config,
        scorer=model.stts_scorer,
        selection=model.stts_config.selection,
    )
    masks = [m for m in packed.keep_masks if m is not None]
    assert len(masks) == len(grids)
    reference, reference_masks, scores = dense_reference(model, pixels, grids, keeps, masks)
    levels = 1 + len(model.visual.deepstack_visual_indexes)
    for ours, ref, mask, ref_mask, item_scores, (_t, h, w) in zip(
        packed.embeds, reference, masks, reference_masks, scores, grids, strict=True
    ):
        assert ours.shape[-1] == levels * model.config.vision_config.out_hidden_size
        assert same_choice_up_to_ties(mask, ref_mask, item_scores, (h // 2) * (w // 2))
        assert_close_to_reference(ours, ref)


@torch.inference_mode()
def test_keep_one_items_on_the_pruned_path_are_stock(model: Any) -> None:
    grids = [(4, 8, 12), (2, 6, 6)]
    pixels = _pixels(grids, seed=7).to(model.visual.device)
    packed = pruned_vision_forward(
        model.visual,
        pixels,
        grids,
        [1.0, 0.5],
        config=model.stts_config,
        scorer=model.stts_scorer,
        selection=model.stts_config.selection,
    )
    stock = model.visual(pixels[: 4 * 8 * 12], grid_thw=[[4, 8, 12]])
    assert packed.keep_masks[0] is None
    torch.testing.assert_close(packed.embeds[0], stock, atol=1e-5, rtol=1e-5)
