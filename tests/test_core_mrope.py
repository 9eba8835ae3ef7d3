"""M-RoPE positions of kept units, and the walk over a prompt's text and media runs."""

import pytest
import torch

from stts_vllm.core import (
    grid_placement,
    mrope_positions,
    mrope_time_factor,
    prompt_mrope_positions,
    step_positions,
    timestamped_video_positions,
)


def test_mrope_positions_match_stock_formula() -> None:
    import numpy as np

    t, h, w, factor = 5, 3, 4, 0.7
    stock = np.indices((t, h, w))
    stock[0] = (stock[0] * factor).astype(np.int64)
    assert torch.equal(mrope_positions(t, h, w, factor), torch.from_numpy(stock.reshape(3, -1)))


def test_training_and_serving_time_factors_agree() -> None:
    """Serving gets `second_per_grid_ts` as a float32 tensor; training computes 2 / fps. At
    25 fps the float64 factor puts step 25 one position lower: both now use float32."""
    serving = float(torch.tensor([2 / 25], dtype=torch.float32)[0]) * 2
    assert mrope_time_factor(2 / 25, 2) == serving
    steps = torch.arange(64, dtype=torch.float64)
    float64_positions = (steps * (4 / 25)).long()
    ours = mrope_positions(64, 1, 1, mrope_time_factor(2 / 25, 2))[0]
    assert not torch.equal(float64_positions, ours)  # the bug this guards against
    assert torch.equal(ours, (steps * serving).long())


def test_prompt_walk_places_text_and_grids_like_the_stock_formula() -> None:
    """Two items (a video of 2x2x3 units, then an image of 1x2x2) among text, written out by
    hand: text advances one by one, an item sits at its grid from the position after the text
    before it, and text resumes past the item's largest position."""
    video, image = mrope_positions(2, 2, 3, 2.0), mrope_positions(1, 2, 2, 1.0)
    grids = [video, image]
    media = [(3, 12), (17, 4)]
    positions, delta = prompt_mrope_positions(
        23, media, lambda i, start: grid_placement(grids[i], start)
    )
    text = lambda start, n: torch.arange(n).expand(3, -1) + start  # noqa: E731
    after_video = 3 + int(video.max()) + 1  # 3 + 2 + 1
    expected = torch.cat(
        [
            text(0, 3),
            video + 3,
            text(after_video, 2),
            image + after_video + 2,
            text(after_video + 2 + 2, 2),
        ],
        dim=1,
    )
    assert torch.equal(positions, expected)
    assert delta == int(expected.max()) + 1 - 23


def test_pruned_item_advances_by_its_real_length_and_resumes_past_its_unpruned_extent() -> None:
    """Two pruned videos in one prompt: each advances the prompt by its placeholder length
    (the stock formula assumed t*h*w and broke here); kept units sit at their own columns."""
    grid = mrope_positions(3, 2, 2, 1.0)
    keep = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
    n = int(keep.sum())
    media = [(1, n), (1 + n + 1, n)]
    positions, _ = prompt_mrope_positions(
        2 * n + 3, media, lambda i, start: grid_placement(grid, start, keep)
    )
    assert positions.shape == (3, 2 * n + 3)
    assert torch.equal(positions[:, 1 : 1 + n], grid[:, keep] + 1)
    second = 1 + int(grid.max()) + 1 + 1  # first item's start, its extent, one text token
    assert torch.equal(positions[:, 2 + n : 2 + 2 * n], grid[:, keep] + second)
    assert positions[:, -1].tolist() == [second + int(grid.max()) + 1] * 3


def test_placeholder_columns_are_the_grid_first_ones() -> None:
    """Before the tower has run, a pruned item's columns are its grid's first `n`."""
    grid = mrope_positions(2, 3, 3, 2.0)
    placed, after = grid_placement(grid, 10, slice(5))
    assert torch.equal(placed, grid[:, :5] + 10)
    assert after == 10 + int(grid.max()) + 1


def test_step_grid_resumes_text_at_the_larger_side() -> None:
    """A Qwen3-VL image (or step): `(0, y, x)`, text resuming at start + max(H, W)."""
    placed, after = grid_placement(step_positions(2, 5), 7)
    assert placed[0].eq(7).all()
    assert after == 7 + 5


@pytest.mark.parametrize("keep", [None, [1, 0, 1, 1, 0, 0, 0, 1]])
def test_timestamped_video_walk_is_one_media_run(keep: list[int] | None) -> None:
    """Qwen3-VL's video span through the prompt walk equals placing it by hand."""
    vs, ve, pad, ts = 1003, 1004, 1007, 27
    mask = None if keep is None else torch.tensor(keep, dtype=torch.bool)
    counts = [4, 4] if mask is None else mask.view(2, 4).sum(1).tolist()
    span = [t for c in counts for t in (ts, vs, *[pad] * c, ve)]
    ids = [5, 6, *span, 9]
    tokens = {"video_token": pad, "vision_start": vs, "vision_end": ve, "keep_mask": mask}
    positions, delta = prompt_mrope_positions(
        len(ids),
        [(2, len(span))],
        lambda _, start: timestamped_video_positions(span, 2, 2, start, **tokens),
    )
    video, after = timestamped_video_positions(span, 2, 2, 2, **tokens)
    expected = torch.cat(
        [torch.arange(2).expand(3, -1), video, torch.arange(1).expand(3, -1) + after], 1
    )
    assert torch.equal(positions, expected)
    assert delta == after + 1 - len(ids)
