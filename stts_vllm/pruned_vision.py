"""STTS pruning inside vLLM's vision towers (Qwen2.5-VL, Qwen3-VL).

The pruned forward pass itself is `stts_vllm.core.driver`; this module only says how vLLM's
towers map onto it: one small adapter per tower (patch embedding, a block call with vLLM's
attention metadata, the mergers), plus the key-biased attention of block `prune_at + 1`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.attention import MMEncoderAttention
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer
from vllm.model_executor.models.qwen3_vl import Qwen3_VisionTransformer
from vllm.model_executor.models.utils import cast_overflow_tensors

from stts_vllm.core import STTSConfig, STTSScorer, varlen_attention
from stts_vllm.core.driver import PrunedTower, PruningPlan, Rotary, plan_pruning, run_pruned_tower
from stts_vllm.core.packing import PackedUnits


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


def install_key_bias(visual: nn.Module, block: int) -> KeyBiasedAttention:
    """Wrap block `block`'s attention kernel once (idempotent); it holds no weights."""
    attn = visual.blocks[block].attn
    if not isinstance(attn.attn, KeyBiasedAttention):
        attn.attn = KeyBiasedAttention(attn.attn)
    return attn.attn


def _varlen_metadata(visual: Any, cu_seqlens: torch.Tensor) -> dict[str, torch.Tensor | None]:
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


class _VLLMTower:
    """What vLLM's Qwen towers share: blocks called with (cu_seqlens, rotary cos/sin,
    max_seqlen, sequence_lengths), the biased block through `KeyBiasedAttention`."""

    visual: Any
    taps: Sequence[int] = ()

    def __init__(self, visual: Any) -> None:
        self.visual = visual
        self.unit_size = visual.spatial_merge_unit
        self.merge = visual.spatial_merge_size
        self.depth = len(visual.blocks)

    def _block_kind(self, index: int) -> str:
        return "full"

    def layout(self, packed: PackedUnits) -> dict[str, dict[str, Any]]:
        return {
            "full": _varlen_metadata(self.visual, packed.cu_seqlens),
            "window": _varlen_metadata(self.visual, packed.cu_window_seqlens),
        }

    def run_block(self, index: int, hidden: torch.Tensor, rotary: Rotary, layout: Any) -> Any:
        cos, sin = rotary
        attention = layout[self._block_kind(index)]
        return self.visual.blocks[index](
            hidden, rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **attention
        )

    def run_biased_block(
        self,
        index: int,
        hidden: torch.Tensor,
        rotary: Rotary,
        packed: PackedUnits,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        # The plain offsets (backends such as FlashInfer rewrite the stock ones).
        full = self._block_kind(index) == "full"
        cu = packed.cu_seqlens if full else packed.cu_window_seqlens
        cos, sin = rotary
        attention = self.visual.blocks[index].attn.attn
        assert isinstance(attention, KeyBiasedAttention)
        with attention.biased(bias):
            return self.visual.blocks[index](
                hidden,
                cu_seqlens=cu,
                rotary_pos_emb_cos=cos,
                rotary_pos_emb_sin=sin,
                max_seqlen=torch.tensor(int(cu.diff().max()), dtype=torch.int32),
                sequence_lengths=None,
            )

    def merge_units(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dtype == torch.float16:  # as stock: long sequences overflow fp16 at the end
            hidden = cast_overflow_tensors(hidden)
        return self.visual.merger(hidden)


class Qwen2_5_VLTower(_VLLMTower):
    """Window attention in most blocks (units in window order), full attention in a few."""

    def __init__(self, visual: Qwen2_5_VisionTransformer) -> None:
        super().__init__(visual)
        self.window = visual.window_size // self.merge // visual.patch_size
        self.full_blocks = set(visual.fullatt_block_indexes)

    def _block_kind(self, index: int) -> str:
        return "full" if index in self.full_blocks else "window"

    def embed(self, pixels: torch.Tensor, plan: PruningPlan) -> tuple[torch.Tensor, Rotary, Any]:
        visual = self.visual
        hidden = visual.input_norm(pixels.to(device=visual.device), visual.dtype)
        hidden = visual.patch_embed(hidden)
        seq_len, dim = hidden.shape
        meta = visual.prepare_encoder_metadata([list(g) for g in plan.grid_thw])
        hidden = hidden.view(-1, self.unit_size, dim)[meta["window_index"]]
        # Unpruned blocks use the stock metadata as is.
        dense = {
            kind: {
                "cu_seqlens": meta[cu],
                "max_seqlen": meta[f"max_seqlen_{kind}"],
                "sequence_lengths": meta.get(f"sequence_lengths_{kind}"),
            }
            for kind, cu in (("full", "cu_seqlens"), ("window", "cu_window_seqlens"))
        }
        rotary = (meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"])
        return hidden.reshape(seq_len, 1, dim), rotary, dense


class Qwen3_VLTower(_VLLMTower):
    """No windows (attention per temporal step; units already in original order), learned
    absolute position embeddings, and deepstack mergers on a few intermediate blocks."""

    window = None

    def __init__(self, visual: Qwen3_VisionTransformer) -> None:
        super().__init__(visual)
        self.taps = tuple(visual.deepstack_visual_indexes)

    def embed(self, pixels: torch.Tensor, plan: PruningPlan) -> tuple[torch.Tensor, Rotary, Any]:
        visual = self.visual
        hidden = visual.input_norm(pixels.to(device=visual.device), visual.dtype)
        hidden = visual.patch_embed(hidden)
        meta = visual.prepare_encoder_metadata([list(g) for g in plan.grid_thw])
        hidden = (hidden + meta["pos_embeds"]).unsqueeze(1)
        dense = {
            "cu_seqlens": meta["cu_seqlens"],
            "max_seqlen": meta["max_seqlen"],
            "sequence_lengths": meta.get("sequence_lengths"),
        }
        rotary = (meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"])
        return hidden, rotary, {"full": dense}

    def layout(self, packed: PackedUnits) -> dict[str, dict[str, Any]]:
        return {"full": _varlen_metadata(self.visual, packed.cu_seqlens)}

    def tap(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.visual.deepstack_merger_list[position](hidden)


def tower_adapter(visual: nn.Module) -> _VLLMTower:
    if isinstance(visual, Qwen3_VisionTransformer):
        return Qwen3_VLTower(visual)
    if isinstance(visual, Qwen2_5_VisionTransformer):
        return Qwen2_5_VLTower(visual)
    raise TypeError(f"no STTS adapter for vision tower {type(visual).__name__}")


def pruned_vision_forward(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: Sequence[Sequence[int]],
    keep_ratios: Sequence[float],
    *,
    config: STTSConfig,
    scorer: STTSScorer | None,
    selection: str = "global",
) -> PrunedTower:
    """Encode video items with STTS pruning; an item with keep ratio 1.0 is encoded exactly
    as the stock tower would (no bias, nothing dropped)."""
    adapter = tower_adapter(visual)
    plan = plan_pruning(adapter, grid_thw, keep_ratios, config, selection)
    return run_pruned_tower(adapter, plan, pixel_values, scorer)
