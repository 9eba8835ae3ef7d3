"""STTS pruning inside vLLM's Qwen2.5-VL vision transformer.

The stock tower runs every block on every patch. Here blocks `0..prune_at` run stock, the
scorer reads their output, block `prune_at + 1` runs with the log-score key bias, and the
remaining blocks and the merger run on the kept units only, packed into variable-length
sequences with no padding. All method logic (scores, selection, packing) is `stts_vllm.core`;
this module only feeds vLLM's tensors through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from vllm.model_executor.layers.attention import MMEncoderAttention
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer
from vllm.model_executor.models.utils import cast_overflow_tensors

from stts_vllm.core import (
    STTSConfig,
    STTSScorer,
    key_bias,
    pack_kept_units,
    retention_mask,
    score_units,
    token_rows,
    varlen_attention,
)


class KeyBiasedAttention(nn.Module):
    """Stands in for one block's `MMEncoderAttention`, with the same call signature.

    Without a bias it defers to the stock kernel; while `key_bias` is set (only inside
    `pruned_vision_forward`, via `biased`) it runs SDPA with the bias added to every key.
    """

    def __init__(self, inner: MMEncoderAttention) -> None:
        super().__init__()
        self.inner = inner
        self.key_bias: torch.Tensor | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: torch.Tensor | None = None,
        sequence_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.key_bias is None:
            return self.inner(
                query,
                key,
                value,
                cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen,
                sequence_lengths=sequence_lengths,
            )
        assert cu_seqlens is not None and query.shape[0] == 1
        out = varlen_attention(
            query[0],
            key[0],
            value[0],
            cu_seqlens.cpu(),
            scale=self.inner.scale,
            key_bias=self.key_bias,
        )
        return out.unsqueeze(0)

    @contextmanager
    def biased(self, bias: torch.Tensor) -> Iterator[None]:
        self.key_bias = bias
        try:
            yield
        finally:
            self.key_bias = None


def install_key_bias(visual: Qwen2_5_VisionTransformer, block: int) -> KeyBiasedAttention:
    """Wrap block `block`'s attention kernel once (idempotent); it holds no weights."""
    attn = visual.blocks[block].attn
    if not isinstance(attn.attn, KeyBiasedAttention):
        attn.attn = KeyBiasedAttention(attn.attn)
    return attn.attn


@dataclass
class PrunedVision:
    """Per video item: its kept units' embeddings in original order, and which units those
    are (`None` when the item kept everything)."""

    embeds: list[torch.Tensor]
    keep_masks: list[torch.Tensor | None]


def _unit_grid(grid_thw: Sequence[int], merge: int) -> tuple[int, int, int]:
    t, h, w = (int(x) for x in grid_thw)
    return t, h // merge, w // merge


def _varlen_metadata(
    visual: Qwen2_5_VisionTransformer, cu_seqlens: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    """The per-backend attention metadata the stock `prepare_encoder_metadata` derives from a
    `cu_seqlens`, for our packed ones."""
    cu_np = cu_seqlens.numpy()
    device = visual.device
    backend = visual.attn_backend
    return {
        "cu_seqlens": MMEncoderAttention.maybe_recompute_cu_seqlens(
            backend,
            cu_np,
            visual.hidden_size,
            visual.tp_size,
            device,
            fp8_padded_hidden_size=visual.fp8_padded_hidden_size,
        ),
        "max_seqlen": torch.tensor(
            MMEncoderAttention.compute_max_seqlen(backend, cu_np), dtype=torch.int32
        ),
        "sequence_lengths": MMEncoderAttention.maybe_compute_seq_lens(backend, cu_np, device),
    }


def pruned_vision_forward(
    visual: Qwen2_5_VisionTransformer,
    pixel_values: torch.Tensor,
    grid_thw: Sequence[Sequence[int]],
    keep_ratios: Sequence[float],
    *,
    config: STTSConfig,
    scorer: STTSScorer | None,
) -> PrunedVision:
    """Encode video items with STTS pruning; an item with keep ratio 1.0 is encoded exactly
    as the stock tower would (no bias, nothing dropped)."""
    merge = visual.spatial_merge_size
    unit_size = visual.spatial_merge_unit
    window = visual.window_size // merge // visual.patch_size
    grids = [_unit_grid(g, merge) for g in grid_thw]
    biased = config.prune_at + 1  # the block that carries the key bias

    hidden = visual.input_norm(pixel_values.to(device=visual.device), visual.dtype)
    hidden = visual.patch_embed(hidden)
    seq_len, dim = hidden.shape
    meta = visual.prepare_encoder_metadata([list(map(int, g)) for g in grid_thw])
    cos, sin = meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"]
    window_index = meta["window_index"]
    hidden = hidden.view(-1, unit_size, dim)[window_index].reshape(seq_len, 1, dim)

    # Unpruned blocks use the stock metadata as is; the biased block needs the plain offsets
    # (backends such as FlashInfer rewrite them), which the all-kept packing gives.
    dense = pack_kept_units(grids, [None] * len(grids), window, unit_size)
    dense_meta = {
        kind: {
            "cu_seqlens": meta[cu],
            "max_seqlen": meta[f"max_seqlen_{kind}"],
            "sequence_lengths": meta.get(f"sequence_lengths_{kind}"),
        }
        for kind, cu in (("full", "cu_seqlens"), ("window", "cu_window_seqlens"))
    }

    def run_block(
        index: int, x: torch.Tensor, layout: dict, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        attention = layout["full" if index in visual.fullatt_block_indexes else "window"]
        return visual.blocks[index](x, rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **attention)

    for index in range(biased):
        hidden = run_block(index, hidden, dense_meta, cos, sin)

    # Score each item in original unit order; choose survivors; build the key bias.
    units = hidden.view(-1, unit_size, dim)[meta["reverse_indices"]]
    keep_masks: list[torch.Tensor | None] = []
    biases: list[torch.Tensor] = []
    offset = 0
    for (t, h, w), keep in zip(grids, keep_ratios, strict=True):
        count = t * h * w
        if keep >= 1.0:
            keep_masks.append(None)
            biases.append(torch.zeros(count, device=hidden.device))
        else:
            item_units = units[offset : offset + count].view(t, h * w, unit_size, dim)
            scores = score_units(item_units, config.scorer, scorer)
            keep_masks.append(retention_mask(scores, keep).reshape(-1))
            biases.append(key_bias(scores, config.bias_floor, config.scorer).reshape(-1))
        offset += count
    unit_bias = torch.cat(biases)[window_index]
    patch_bias = unit_bias.repeat_interleave(unit_size)

    biased_attention = visual.blocks[biased].attn.attn
    assert isinstance(biased_attention, KeyBiasedAttention)
    kind = "full" if biased in visual.fullatt_block_indexes else "window"
    real_cu = dense.cu_seqlens if kind == "full" else dense.cu_window_seqlens
    with biased_attention.biased(patch_bias):
        hidden = visual.blocks[biased](
            hidden,
            cu_seqlens=real_cu,
            rotary_pos_emb_cos=cos,
            rotary_pos_emb_sin=sin,
            max_seqlen=dense_meta[kind]["max_seqlen"],
            sequence_lengths=None,
        )

    # Hard pruning: keep the surviving units' rows and re-cut the sequences around them.
    packed = pack_kept_units(grids, keep_masks, window, unit_size)
    rows = token_rows(packed.kept_rows, unit_size).to(hidden.device)
    hidden, cos, sin = hidden[rows], cos[rows], sin[rows]
    packed_meta = {
        "full": _varlen_metadata(visual, packed.cu_seqlens),
        "window": _varlen_metadata(visual, packed.cu_window_seqlens),
    }
    for index in range(biased + 1, len(visual.blocks)):
        hidden = run_block(index, hidden, packed_meta, cos, sin)
    if hidden.dtype == torch.float16:  # as stock: long sequences overflow fp16 at the end
        hidden = cast_overflow_tensors(hidden)

    merged = visual.merger(hidden)[packed.restore.to(hidden.device)]
    return PrunedVision(embeds=list(merged.split(packed.kept_per_item)), keep_masks=keep_masks)
