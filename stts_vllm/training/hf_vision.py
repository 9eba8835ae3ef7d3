"""STTS pruning inside transformers' Qwen2.5-VL vision tower, for training.

The same steps as `stts_vllm.pruned_vision` (vLLM's tower), on transformers' modules, with
gradients: blocks `0..prune_at` on every patch, the scorer on their output (plus its temporal
target for the auxiliary loss), block `prune_at + 1` with the log-score key bias (the path by
which the LLM loss reaches the scorer), then the kept units only, packed with no padding. All
method logic is `stts_vllm.core`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionBlock,
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import get_vision_position_ids

from stts_vllm.core import (
    STTSConfig,
    key_bias,
    pack_kept_units,
    retention_mask,
    score_units,
    temporal_loss,
    temporal_target,
    token_rows,
    varlen_attention,
)


@dataclass
class PrunedVisionOutput:
    """Per item: kept units' embeddings in original order and which units those are (None:
    all kept); the scorer's scores and temporal targets (pruned items, for the aux loss and
    for correlation reports); the mean temporal loss over pruned items (0 without any)."""

    embeds: list[torch.Tensor]
    keep_masks: list[torch.Tensor | None]
    scores: list[torch.Tensor | None] = field(default_factory=list)
    targets: list[torch.Tensor | None] = field(default_factory=list)
    temporal_loss: torch.Tensor | None = None


def _biased_block(
    block: Qwen2_5_VLVisionBlock,
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """One transformers vision block with an additive per-key bias in its attention."""
    attn = block.attn
    x = block.norm1(hidden)
    q, k, v = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    out = varlen_attention(q, k, v, cu_seqlens, scale=attn.scaling, key_bias=bias)
    hidden = hidden + attn.proj(out.reshape(x.shape[0], -1))
    return hidden + block.mlp(block.norm2(hidden))


def pruned_vision_forward(
    visual: Qwen2_5_VisionTransformerPretrainedModel,
    pixel_values: torch.Tensor,
    grid_thw: Sequence[Sequence[int]],
    keep_ratios: Sequence[float],
    *,
    config: STTSConfig,
    scorer: nn.Module | None,
) -> PrunedVisionOutput:
    """Encode video items with STTS; an item with keep ratio 1.0 is encoded exactly as the
    stock tower would (no bias, nothing dropped)."""
    merge = visual.spatial_merge_size
    unit_size = visual.spatial_merge_unit
    window = visual.window_size // merge // visual.patch_size
    grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw]
    biased = config.prune_at + 1
    full = set(visual.fullatt_block_indexes)

    hidden = visual.patch_embed(pixel_values)
    seq_len, dim = hidden.shape
    dense = pack_kept_units(grids, [None] * len(grids), window, unit_size)
    window_index = dense.window_index.to(hidden.device)
    grid_tensor = torch.tensor([[int(x) for x in g] for g in grid_thw], device=hidden.device)
    cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_tensor, merge))
    cos, sin = (
        f.reshape(-1, unit_size, f.shape[-1])[window_index].reshape(seq_len, -1) for f in (cos, sin)
    )
    hidden = hidden.view(-1, unit_size, dim)[window_index].reshape(seq_len, dim)

    def run(index: int, x: torch.Tensor, packed, c: torch.Tensor, s: torch.Tensor):
        cu = packed.cu_seqlens if index in full else packed.cu_window_seqlens
        return visual.blocks[index](x, cu_seqlens=cu, position_embeddings=(c, s))

    for index in range(biased):
        hidden = run(index, hidden, dense, cos, sin)

    units = hidden.view(-1, unit_size, dim)[torch.argsort(window_index)]
    out = PrunedVisionOutput(embeds=[], keep_masks=[])
    losses, biases = [], []
    offset = 0
    for (t, h, w), keep in zip(grids, keep_ratios, strict=True):
        count = t * h * w
        if keep >= 1.0:
            out.keep_masks.append(None)
            out.scores.append(None)
            out.targets.append(None)
            biases.append(hidden.new_zeros(count))
        else:
            item = units[offset : offset + count].view(t, h * w, unit_size, dim)
            scores = score_units(item, config.scorer, scorer)
            target = temporal_target(item.detach())
            if config.scorer == "learned":
                losses.append(temporal_loss(scores, target))
            out.keep_masks.append(retention_mask(scores.detach(), keep).reshape(-1))
            out.scores.append(scores.detach())
            out.targets.append(target)
            biases.append(key_bias(scores, config.bias_floor, config.scorer).reshape(-1))
        offset += count
    if losses:
        out.temporal_loss = torch.stack(losses).mean()
    patch_bias = torch.cat(biases).to(hidden.dtype)[window_index].repeat_interleave(unit_size)

    cu = dense.cu_seqlens if biased in full else dense.cu_window_seqlens
    hidden = _biased_block(visual.blocks[biased], hidden, cu, cos, sin, patch_bias)

    packed = pack_kept_units(grids, out.keep_masks, window, unit_size)
    rows = token_rows(packed.kept_rows, unit_size).to(hidden.device)
    hidden, cos, sin = hidden[rows], cos[rows], sin[rows]
    for index in range(biased + 1, len(visual.blocks)):
        hidden = run(index, hidden, packed, cos, sin)
    merged = visual.merger(hidden)[packed.restore.to(hidden.device)]
    out.embeds = list(merged.split(packed.kept_per_item))
    return out
