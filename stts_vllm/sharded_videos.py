"""Pruned videos across the ranks of a data-parallel vision encoder (`mm_encoder_tp_mode="data"`).

Stock vLLM shards a batch's media over the tensor-parallel ranks, each rank encoding its share
with a full copy of the tower, then all-gathers the embeddings
(`run_dp_sharded_mrope_vision_model`). Pruned videos go the same way, with one addition: the
keep mask each rank's tower chose travels with the embeddings, so every rank places the same
kept units at the same positions. Each video is scored on exactly one rank: the ranks agree on
its mask because there is only one, not because their top-k happened to match bitwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

EncodeItems = Callable[[list[int]], list[tuple[torch.Tensor, torch.Tensor]]]
"""Encodes the items at these indices: each one's (kept embeddings `[n, D]`, keep mask `[U]`)."""
AllGather = Callable[[torch.Tensor], torch.Tensor]
"""Concatenates every rank's equally sized tensor along dim 0, in rank order."""


def balance(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Each rank's item indices, balanced by input size the way stock vLLM balances media."""
    from vllm.model_executor.models.vision import get_load_balance_assignment

    order, counts, _ = get_load_balance_assignment(list(sizes), world)
    bounds = [0, *itertools.accumulate(counts)]
    return [order[bounds[r] : bounds[r + 1]] for r in range(world)]


def _padded(rows: list[torch.Tensor], length: int, like: torch.Tensor) -> torch.Tensor:
    """`rows` stacked along dim 0 and padded to `length` rows (all_gather needs equal sizes)."""
    flat = torch.cat(rows) if rows else like.new_zeros((0, *like.shape[1:]))
    pad = flat.new_zeros((length - flat.shape[0], *flat.shape[1:]))
    return torch.cat([flat, pad])


def run_sharded(
    sizes: Sequence[int],
    kept_tokens: Sequence[int],
    units: Sequence[int],
    encode: EncodeItems,
    *,
    rank: int,
    world: int,
    all_gather: AllGather,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every item's (embeddings, keep mask) on every rank, each item encoded on one rank.

    `sizes` balance the work (input patches); `kept_tokens` and `units` are each item's
    output rows and mask length, known on every rank from its grid and keep ratio, so the
    gathered tensors can be cut without another collective."""
    shards = balance(sizes, world)
    local = shards[rank]
    outputs = encode(local)
    if [e.shape[0] for e, _ in outputs] != [kept_tokens[i] for i in local]:
        raise RuntimeError("a rank's pruned tower kept a different count than planned")

    def rows_per_rank(counts: Sequence[int]) -> int:
        return max((sum(counts[i] for i in shard) for shard in shards), default=0)

    like_embeds = torch.empty((0, width), dtype=dtype, device=device)
    embeds = all_gather(_padded([e for e, _ in outputs], rows_per_rank(kept_tokens), like_embeds))
    like_mask = torch.empty((0,), dtype=torch.uint8, device=device)
    masks = all_gather(
        _padded([m.to(torch.uint8) for _, m in outputs], rows_per_rank(units), like_mask)
    )

    embed_stride, mask_stride = embeds.shape[0] // world, masks.shape[0] // world
    result: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(sizes)
    for r, shard in enumerate(shards):
        e_at, m_at = r * embed_stride, r * mask_stride
        for i in shard:
            result[i] = (
                embeds[e_at : e_at + kept_tokens[i]],
                masks[m_at : m_at + units[i]].bool(),
            )
            e_at += kept_tokens[i]
            m_at += units[i]
    assert all(item is not None for item in result)
    return result  # type: ignore[return-value]
