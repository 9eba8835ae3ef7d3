"""Packing kept units into the ViT's varlen sequences and windows."""

from types import SimpleNamespace

import pytest
import torch

from stts_vllm.core import pack_kept_units, token_rows, window_partition

GRIDS = [(1, 4, 4), (2, 3, 5), (3, 8, 8), (2, 9, 7), (4, 1, 1), (1, 5, 13)]


@pytest.mark.parametrize(("t", "h", "w"), GRIDS)
def test_window_partition_matches_stock_vllm(t: int, h: int, w: int) -> None:
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer

    stock = SimpleNamespace(
        window_size=112, spatial_merge_size=2, patch_size=14, spatial_merge_unit=4
    )
    index, cu = Qwen2_5_VisionTransformer.get_window_index_thw(stock, t, 2 * h, 2 * w)
    order, sizes = window_partition(t, h, w, window=4)
    assert torch.equal(order, index)
    ours = torch.cumsum(sizes * 4, 0).to(torch.int32).unique_consecutive()
    assert torch.equal(ours, cu)


def test_pack_all_kept_is_the_unpruned_layout() -> None:
    packed = pack_kept_units([(2, 3, 5), (1, 4, 4)], [None, None], window=4, unit_size=4)
    assert packed.kept_rows.tolist() == list(range(2 * 15 + 16))
    assert packed.cu_seqlens.tolist() == [0, 60, 120, 184]  # per step, in patch tokens
    assert packed.kept_per_item == [30, 16]
    merged_in_window_order = packed.window_index  # stand-in for per-unit outputs
    assert torch.equal(merged_in_window_order[packed.restore], torch.arange(46))


def test_pack_drops_empty_windows_and_steps_and_restores_order() -> None:
    t, h, w = 3, 8, 8  # windows of 4x4 units: (8+4)//4 = 3 per axis, 4 non-empty per step
    keep = torch.zeros(t, h, w, dtype=torch.bool)
    keep[0] = True
    keep[2, :4, :4] = True  # one window of step 2; step 1 is dropped entirely
    keep[2, 7, 7] = True
    packed = pack_kept_units([(t, h, w)], [keep.reshape(-1)], window=4, unit_size=4)
    assert packed.cu_seqlens.tolist() == [0, 256, 256 + 17 * 4]
    window_lengths = packed.cu_window_seqlens.diff().tolist()
    assert window_lengths == [64, 64, 64, 64, 64, 4]
    kept_ids = packed.window_index[packed.kept_rows]
    assert torch.equal(kept_ids[packed.restore], keep.reshape(-1).nonzero().squeeze(-1))


def test_token_rows_expand_units_to_patches() -> None:
    assert token_rows(torch.tensor([0, 2]), 4).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_pack_rejects_mask_of_wrong_size() -> None:
    with pytest.raises(ValueError, match="keep mask"):
        pack_kept_units([(2, 2, 2)], [torch.ones(7, dtype=torch.bool)], window=4, unit_size=4)


def test_pack_without_windows_keeps_original_order_one_sequence_per_step() -> None:
    """Qwen3-VL's tower: no window order; attention per temporal step."""
    keep = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    packed = pack_kept_units([(3, 2, 2)], [keep.reshape(-1)], window=None, unit_size=4)
    assert packed.window_index.tolist() == list(range(12))
    assert packed.kept_rows.tolist() == [0, 1, 2, 3, 5]
    assert packed.cu_seqlens.tolist() == [0, 16, 20]  # the empty step is dropped
    assert torch.equal(packed.cu_window_seqlens, packed.cu_seqlens)
    assert packed.restore.tolist() == [0, 1, 2, 3, 4]


def test_budget_batches_keep_order_and_stay_within_the_budget() -> None:
    from stts_vllm.core import budget_batches

    assert budget_batches([3, 3, 3], 6) == [[0, 1], [2]]
    assert budget_batches([7, 1, 1], 6) == [[0], [1, 2]]  # too big alone: a batch of its own
    assert budget_batches([2, 5, 2, 2], 6) == [[0], [1], [2, 3]]
    assert budget_batches([1, 2, 3], None) == [[0, 1, 2]]
    assert budget_batches([], 4) == []
    assert budget_batches([4, 4], 1) == [[0], [1]]  # one call per video
    with pytest.raises(ValueError, match="positive"):
        budget_batches([1], 0)
