"""STTS pruning inside vLLM's vision towers (Qwen2.5-VL, Qwen3-VL).

The pruned forward pass itself is `stts_vllm.core.driver`; this module only says how vLLM's
towers map onto it: one small adapter per tower (patch embedding, a block call with vLLM's
attention metadata, the mergers), plus block `prune_at + 1`'s key-biased attention through
vLLM's own encoder attention kernel (`biased_attention`). The stock blocks are never
modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.attention import MMEncoderAttention
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer
from vllm.model_executor.models.qwen3_vl import Qwen3_VisionTransformer
from vllm.model_executor.models.utils import cast_overflow_tensors
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from stts_vllm.core import BIAS_CHANNELS, STTSConfig, STTSScorer, with_key_bias_channel
from stts_vllm.core.driver import PrunedTower, PruningPlan, Rotary, plan_pruning, run_pruned_tower
from stts_vllm.core.packing import PackedUnits
from stts_vllm.families import tower_adapter_class


def install_biased_kernel(visual: nn.Module, block: int) -> MMEncoderAttention:
    """The attention kernel of the biased block: vLLM's own `MMEncoderAttention` (the backend
    vLLM picks for this head size), for heads `BIAS_CHANNELS` wider (see
    `core.attention`). Built once, at model construction, beside the stock blocks, which stay
    untouched; it holds no weights. Idempotent."""
    existing = getattr(visual, "stts_biased_attention", None)
    if existing is not None:
        return existing
    stock = visual.blocks[block].attn
    kernel = MMEncoderAttention(
        num_heads=stock.num_attention_heads_per_partition,
        head_size=stock.hidden_size_per_attention_head + BIAS_CHANNELS,
        scale=stock.attn.scale,
        prefix=f"blocks.{block}.attn.stts_biased",
    )
    visual.stts_biased_attention = kernel
    return kernel


def biased_attention(
    attn: Any,
    kernel: MMEncoderAttention,
    x: torch.Tensor,
    rotary: Rotary,
    metadata: dict[str, Any],
    bias: torch.Tensor,
) -> torch.Tensor:
    """`Qwen2_5_VisionAttention.forward` (vLLM 0.32, shared by the Qwen2.5-VL and Qwen3-VL
    towers) with `bias` added to every key's logit: the stock projections and rotary
    embedding, the stock kernel on heads `BIAS_CHANNELS` wider, one call for every sequence."""
    qkv, _ = attn.qkv(x)
    seq_len, batch, _ = qkv.shape
    heads, head_dim = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
    qkv = qkv.view(seq_len, batch, 3, heads, head_dim).permute(2, 1, 0, 3, 4)  # 3 b s h d
    qk = qkv[:2].reshape(2 * batch, seq_len, heads, head_dim).contiguous()
    q, k = attn.apply_rotary_emb(qk, *rotary).view(2, batch, seq_len, heads, head_dim).unbind(0)
    q, k, v = with_key_bias_channel(q, k, qkv[2], bias, kernel.scale)
    out = kernel(query=q, key=k, value=v, **metadata)[..., :head_dim]  # b s h d
    out = out.permute(1, 0, 2, 3).reshape(seq_len, batch, heads * head_dim).contiguous()
    projected, _ = attn.proj(out)
    return projected


def _varlen_metadata(
    visual: Any, cu_seqlens: torch.Tensor, kernel: MMEncoderAttention | None = None
) -> dict[str, torch.Tensor | None]:
    """The per-backend attention metadata the stock `prepare_encoder_metadata` derives from a
    `cu_seqlens` (host memory: no device sync), for our packed ones; for `kernel`'s backend and
    head size when given (the biased block's wider heads)."""
    cu_np = cu_seqlens.numpy()
    device = visual.device
    backend = visual.attn_backend if kernel is None else kernel.attn_backend
    hidden_size = visual.hidden_size
    fp8_hidden = visual.fp8_padded_hidden_size
    if kernel is not None:
        hidden_size = kernel.num_heads * kernel.head_size * visual.tp_size
        fp8_hidden = None
    return {
        "cu_seqlens": MMEncoderAttention.maybe_recompute_cu_seqlens(
            backend,
            cu_np,
            hidden_size,
            visual.tp_size,
            device,
            fp8_padded_hidden_size=fp8_hidden,
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

    def host_sync(self) -> AbstractContextManager[Any]:
        return gpu_sync_allowed()

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
        full = self._block_kind(index) == "full"
        cu = packed.cu_seqlens if full else packed.cu_window_seqlens
        block = self.visual.blocks[index]
        kernel = self.visual.stts_biased_attention
        metadata = _varlen_metadata(self.visual, cu, kernel)
        attended = biased_attention(block.attn, kernel, block.norm1(hidden), rotary, metadata, bias)
        return self._finish_block(block, hidden, attended)

    def _finish_block(self, block: Any, hidden: torch.Tensor, attended: torch.Tensor) -> Any:
        """The rest of the stock block's forward after its attention."""
        raise NotImplementedError

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

    def _finish_block(self, block: Any, hidden: torch.Tensor, attended: torch.Tensor) -> Any:
        normed, residual = block.norm2(hidden, residual=attended)  # Qwen2_5_VisionBlock
        return residual + block.mlp(normed)

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

    def _finish_block(self, block: Any, hidden: torch.Tensor, attended: torch.Tensor) -> Any:
        hidden = hidden + attended  # Qwen3_VisionBlock
        return hidden + block.mlp(block.norm2(hidden))

    def tap(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.visual.deepstack_merger_list[position](hidden)


def tower_adapter(visual: nn.Module) -> _VLLMTower:
    """The adapter its family names for this vLLM tower (`Family.vllm_tower`)."""
    return tower_adapter_class(visual, "vllm")(visual)


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
