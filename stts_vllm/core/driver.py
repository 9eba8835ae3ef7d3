"""The pruned forward pass of a vision tower, written once for every tower and framework.

STTS changes the middle of a ViT, not its ends: blocks `0..prune_at` run on every patch, the
scorer reads their output, block `prune_at + 1` runs with the log-score key bias, the
low-scoring units are dropped, and the remaining blocks and the merger see only the kept
units, packed into variable-length sequences with no padding. `plan_pruning` fixes what can be
known before the tower runs (grids, dense layout, which block is biased); `run_pruned_tower`
executes the plan on a `TowerAdapter`, the few dozen lines that say how one tower (vLLM's or
transformers' Qwen2.5-VL, Qwen3-VL, ...) embeds patches, runs a block, and merges units.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from stts_vllm.core.config import STTSConfig
from stts_vllm.core.packing import PackedUnits, pack_kept_units, token_rows
from stts_vllm.core.scoring import key_bias, score_units, temporal_loss, temporal_target
from stts_vllm.core.selection import retention_mask, sample_retention

Rotary = tuple[torch.Tensor, ...]
"""Per-patch-row tensors that travel with the hidden states (rotary cos/sin, ...)."""


class TowerAdapter(Protocol):
    """What the driver needs from one vision tower.

    Hidden states are patch rows (`[S, ...]`, any trailing shape) in the tower's processing
    order: the `unit_size` patches of a unit consecutive, units in window order (or original
    order when `window` is None). Layouts are the adapter's own attention metadata.
    """

    unit_size: int  # patches per LLM token (spatial merge squared)
    merge: int  # spatial merge size (patches per unit side)
    window: int | None  # window side in units; None: attention per temporal step only
    depth: int  # number of blocks
    taps: Sequence[int]  # blocks whose output feeds extra outputs (deepstack), in output order

    def embed(self, pixels: torch.Tensor, plan: PruningPlan) -> tuple[torch.Tensor, Rotary, Any]:
        """Patch embedding (plus absolute position embedding, if any): hidden rows, their
        rotary tensors, and the attention layout of the unpruned items."""
        ...

    def layout(self, packed: PackedUnits) -> Any:
        """The attention layout of packed (pruned) sequences."""
        ...

    def run_block(self, index: int, hidden: torch.Tensor, rotary: Rotary, layout: Any) -> Any: ...

    def run_biased_block(
        self,
        index: int,
        hidden: torch.Tensor,
        rotary: Rotary,
        packed: PackedUnits,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        """Block `index` with `bias[key]` (`[S]`, float32) added to every query's logit."""
        ...

    def host_sync(self) -> AbstractContextManager[Any]:
        """Where the driver reads the chosen units back to the host (packing needs Python
        sizes): vLLM's `gpu_sync_allowed()`, so `VLLM_GPU_SYNC_CHECK` knows it is meant."""
        ...

    def tap(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """Extra output `position` (of `taps`) from the rows it is given: `[units, out]`."""
        ...

    def merge_units(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final merger: `[units, out]`."""
        ...


@dataclass(frozen=True)
class PruningPlan:
    """Everything known before the tower runs. `grids` are in units (`T, H/merge, W/merge`)."""

    grid_thw: list[tuple[int, int, int]]
    grids: list[tuple[int, int, int]]
    keep_ratios: list[float]
    dense: PackedUnits
    biased: int
    selection: str
    config: STTSConfig
    # Training only: > 0 draws each learned-scorer item's kept set (`sample_retention`, this
    # temperature) instead of taking the top-k, and records the draw's log-probability.
    explore: float = 0.0


def plan_pruning(
    adapter: TowerAdapter,
    grid_thw: Sequence[Sequence[int]],
    keep_ratios: Sequence[float],
    config: STTSConfig,
    selection: str,
    explore: float = 0.0,
) -> PruningPlan:
    config.check_vit_depth(adapter.depth)
    grid_thw = [tuple(int(x) for x in g) for g in grid_thw]
    grids = [(t, h // adapter.merge, w // adapter.merge) for t, h, w in grid_thw]
    if len(keep_ratios) != len(grids):
        raise ValueError(f"{len(keep_ratios)} keep ratios for {len(grids)} items")
    return PruningPlan(
        grid_thw=grid_thw,  # type: ignore[arg-type]
        grids=grids,
        keep_ratios=[float(k) for k in keep_ratios],
        dense=pack_kept_units(grids, [None] * len(grids), adapter.window, adapter.unit_size),
        biased=config.prune_at + 1,
        selection=selection,
        config=config,
        explore=explore,
    )


@dataclass
class PrunedTower:
    """Per item: the kept units' embeddings in original unit order (extra outputs such as
    deepstack features concatenated on the last dim, as the stock tower concatenates them)
    and the keep mask over all units (None: all kept); for pruned items the scores and, when
    asked for, temporal targets; the mean temporal loss of learned-scorer items; per item,
    the log-probability of an explored draw (None where the kept set was the top-k)."""

    embeds: list[torch.Tensor]
    keep_masks: list[torch.Tensor | None]
    scores: list[torch.Tensor | None] = field(default_factory=list)
    targets: list[torch.Tensor | None] = field(default_factory=list)
    temporal_loss: torch.Tensor | None = None
    temporal_terms: int = 0  # how many items the temporal loss averages
    log_probs: list[torch.Tensor | None] = field(default_factory=list)


def _select(
    units: torch.Tensor, plan: PruningPlan, scorer: nn.Module | None, want_targets: bool
) -> tuple[PrunedTower, torch.Tensor]:
    """Score each item's units (original order), choose survivors, build the unit key bias."""
    config = plan.config
    out = PrunedTower(embeds=[], keep_masks=[])
    losses, biases = [], []
    offset = 0
    for (t, h, w), keep in zip(plan.grids, plan.keep_ratios, strict=True):
        count = t * h * w
        item = units[offset : offset + count]
        offset += count
        if keep >= 1.0:
            out.keep_masks.append(None)
            out.scores.append(None)
            out.targets.append(None)
            out.log_probs.append(None)
            biases.append(torch.zeros(count, device=units.device))
            continue
        item = item.reshape(t, h * w, *units.shape[1:])
        scores = score_units(item, config.scorer, scorer)
        target = temporal_target(item.detach()) if want_targets else None
        if config.scorer == "learned" and target is not None:
            losses.append(temporal_loss(scores, target))
        if plan.explore > 0 and config.scorer == "learned":
            mask, log_prob = sample_retention(scores, keep, plan.selection, plan.explore)
        else:
            mask, log_prob = retention_mask(scores.detach(), keep, plan.selection), None
        out.keep_masks.append(mask.reshape(-1))
        out.log_probs.append(log_prob)
        out.scores.append(scores.detach())
        out.targets.append(target)
        biases.append(key_bias(scores, config.bias_floor, config.scorer).reshape(-1).float())
    if losses:
        out.temporal_loss = torch.stack(losses).mean()
        out.temporal_terms = len(losses)
    return out, torch.cat(biases)


def run_pruned_tower(
    adapter: TowerAdapter,
    plan: PruningPlan,
    pixels: torch.Tensor,
    scorer: nn.Module | None,
    *,
    want_targets: bool = False,
) -> PrunedTower:
    """Encode the plan's items with STTS; an item with keep ratio 1.0 is encoded as the stock
    tower would (no bias, nothing dropped)."""
    unit_size = adapter.unit_size
    hidden, rotary, layout = adapter.embed(pixels, plan)
    device = hidden.device
    window_index = plan.dense.window_index.to(device)
    taps: dict[int, torch.Tensor] = {}

    def run(index: int, x: torch.Tensor, layout: Any) -> torch.Tensor:
        x = adapter.run_block(index, x, rotary, layout)
        if index in adapter.taps:
            taps[index] = adapter.tap(list(adapter.taps).index(index), x)
        return x

    for index in range(plan.biased):
        hidden = run(index, hidden, layout)

    units = hidden.reshape(-1, unit_size, hidden.shape[-1])[torch.argsort(window_index)]
    out, unit_bias = _select(units, plan, scorer, want_targets)
    patch_bias = unit_bias[window_index].repeat_interleave(unit_size)
    hidden = adapter.run_biased_block(plan.biased, hidden, rotary, plan.dense, patch_bias)
    if plan.biased in adapter.taps:
        taps[plan.biased] = adapter.tap(list(adapter.taps).index(plan.biased), hidden)

    # Hard pruning: keep the surviving units' rows and re-cut the sequences around them.
    with adapter.host_sync():  # the one device-to-host read of the pruned pass
        packed = pack_kept_units(plan.grids, out.keep_masks, adapter.window, unit_size)
    kept_units = packed.kept_rows.to(device)
    rows = token_rows(kept_units, unit_size)
    hidden = hidden[rows]
    rotary = tuple(r[rows] for r in rotary)
    taps = {i: feature[kept_units] for i, feature in taps.items()}  # taken before pruning
    layout = adapter.layout(packed)
    for index in range(plan.biased + 1, adapter.depth):
        hidden = run(index, hidden, layout)

    merged = torch.cat([adapter.merge_units(hidden), *(taps[i] for i in adapter.taps)], dim=-1)
    merged = merged[packed.restore.to(device)]
    out.embeds = list(merged.split(packed.kept_per_item))
    return out
