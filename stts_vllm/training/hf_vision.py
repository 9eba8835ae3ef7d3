"""STTS inside transformers' Qwen2.5-VL and Qwen3-VL vision towers, for training.

The pruned forward pass is `stts_vllm.core.driver`, the same one vLLM's towers run; this is
the adapter for transformers' modules, with gradients: the key bias of block `prune_at + 1`
is how the LLM loss reaches the scorer, and the driver also returns the temporal targets
for the auxiliary loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import get_vision_position_ids

from stts_vllm.core import STTSConfig, varlen_attention
from stts_vllm.core.driver import PrunedTower, PruningPlan, Rotary, plan_pruning, run_pruned_tower
from stts_vllm.core.packing import PackedUnits
from stts_vllm.families import tower_adapter_class

PrunedVisionOutput = PrunedTower  # the training code's name for the driver's output


class _HFTower:
    """What transformers' Qwen towers share: blocks of norm, attention (`qkv`, `proj`) with
    `cu_seqlens` and `position_embeddings=(cos, sin)`, norm, MLP; one attention layout for
    all blocks.

    The blocks run here, on the blocks' own weights, with `varlen_attention` (one SDPA call
    per window length; one FlashAttention varlen call on CUDA in half precision) and the
    patch embedding's stride-equals-kernel Conv3d as the matmul it is: transformers' SDPA
    path runs one attention call per window, which `bench/train_step.py` measures against
    this. `stock_blocks` runs transformers' own modules instead (the reference the tests
    and that benchmark compare with)."""

    taps: Sequence[int] = ()
    window: int | None = None

    def __init__(self, visual: nn.Module, stock_blocks: bool = False) -> None:
        self.visual = visual
        self.unit_size = visual.spatial_merge_unit
        self.merge = visual.spatial_merge_size
        self.depth = len(visual.blocks)
        self.stock_blocks = stock_blocks

    def _cu(self, index: int, packed: PackedUnits) -> torch.Tensor:
        return packed.cu_seqlens

    def host_sync(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def layout(self, packed: PackedUnits) -> PackedUnits:
        return packed

    def patch_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        embed = self.visual.patch_embed
        if self.stock_blocks:
            return embed(pixels)
        weight = embed.proj.weight
        return F.linear(pixels.to(weight.dtype), weight.flatten(1), embed.proj.bias)

    def run_block(self, index: int, hidden: torch.Tensor, rotary: Rotary, layout: Any) -> Any:
        cu = self._cu(index, layout)
        if self.stock_blocks:
            return self.visual.blocks[index](hidden, cu_seqlens=cu, position_embeddings=rotary)
        return self._block(index, hidden, rotary, cu, None)

    def run_biased_block(
        self,
        index: int,
        hidden: torch.Tensor,
        rotary: Rotary,
        packed: PackedUnits,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        return self._block(index, hidden, rotary, self._cu(index, packed), bias)

    def _block(
        self,
        index: int,
        hidden: torch.Tensor,
        rotary: Rotary,
        cu: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        block = self.visual.blocks[index]
        attn = block.attn
        x = block.norm1(hidden)
        qkv = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1)
        q, k, v = qkv.permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *rotary)
        out = varlen_attention(q, k, v, cu, scale=attn.scaling, key_bias=bias)
        hidden = hidden + attn.proj(out.reshape(x.shape[0], -1))
        return hidden + block.mlp(block.norm2(hidden))

    def tap(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.visual.deepstack_merger_list[position](hidden)

    def merge_units(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.visual.merger(hidden)


class HFQwen2_5_VLTower(_HFTower):
    """transformers' Qwen2.5-VL tower: window order, full attention in a few blocks."""

    def __init__(
        self, visual: Qwen2_5_VisionTransformerPretrainedModel, stock_blocks: bool = False
    ) -> None:
        super().__init__(visual, stock_blocks)
        self.window = visual.window_size // self.merge // visual.patch_size
        self.full_blocks = set(visual.fullatt_block_indexes)

    def _cu(self, index: int, packed: PackedUnits) -> torch.Tensor:
        return packed.cu_seqlens if index in self.full_blocks else packed.cu_window_seqlens

    def embed(self, pixels: torch.Tensor, plan: PruningPlan) -> tuple[torch.Tensor, Rotary, Any]:
        visual = self.visual
        hidden = self.patch_embed(pixels)
        seq_len, dim = hidden.shape
        window_index = plan.dense.window_index.to(hidden.device)
        grid = torch.tensor(plan.grid_thw, device=hidden.device)
        cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, self.merge))
        rotary = tuple(
            f.reshape(-1, self.unit_size, f.shape[-1])[window_index].reshape(seq_len, -1)
            for f in (cos, sin)
        )
        hidden = hidden.view(-1, self.unit_size, dim)[window_index].reshape(seq_len, dim)
        return hidden, rotary, plan.dense


class HFQwen3_VLTower(_HFTower):
    """transformers' Qwen3-VL tower: no windows, learned absolute position embeddings
    (interpolated), deepstack mergers on a few blocks."""

    def __init__(self, visual: Any, stock_blocks: bool = False) -> None:
        super().__init__(visual, stock_blocks)
        self.taps = tuple(getattr(visual, "deepstack_visual_indexes", ()))  # Qwen3.5: none

    def embed(self, pixels: torch.Tensor, plan: PruningPlan) -> tuple[torch.Tensor, Rotary, Any]:
        from transformers.models.qwen3_vl import modeling_qwen3_vl as hf

        visual = self.visual
        grid = torch.tensor(plan.grid_thw, device=pixels.device)
        indices, weights = hf.get_vision_interpolation_indices_and_weights(
            grid,
            num_grid_per_side=visual.num_grid_per_side,
            mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners,
            spatial_merge_size=self.merge,
        )
        hidden = self.patch_embed(pixels)
        pos_embeds = (visual.pos_embed(indices) * weights[:, :, None]).sum(1)
        hidden = hidden + pos_embeds.to(hidden.dtype)
        rotary = visual.rotary_pos_emb(hidden, hf.get_vision_position_ids(grid, self.merge))
        return hidden.reshape(hidden.shape[0], -1), tuple(rotary), plan.dense


def tower_adapter(visual: nn.Module, stock_blocks: bool = False) -> _HFTower:
    """The adapter its family names for this transformers tower (`Family.transformers_tower`)."""
    return tower_adapter_class(visual, "transformers")(visual, stock_blocks)


def pruned_vision_forward(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: Sequence[Sequence[int]],
    keep_ratios: Sequence[float],
    *,
    config: STTSConfig,
    scorer: nn.Module | None,
    selection: str = "global",
    explore: float = 0.0,
    stock_blocks: bool = False,
) -> PrunedTower:
    """Encode video items with STTS, returning the temporal targets the loss needs; an item
    with keep ratio 1.0 is encoded exactly as the stock tower would. `explore` > 0 draws the
    learned scorer's kept sets (see `sample_retention`)."""
    adapter = tower_adapter(visual, stock_blocks)
    plan = plan_pruning(adapter, grid_thw, keep_ratios, config, selection, explore)
    return run_pruned_tower(adapter, plan, pixel_values, scorer, want_targets=True)
