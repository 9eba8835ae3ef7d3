"""Frame plans, frame sizes and video token counts (`stts_vllm.media.frames`): pure arithmetic,
no video, engine or server."""

from __future__ import annotations

import math
from typing import Any

import pytest

from stts_vllm.core import retained_count
from stts_vllm.media.frames import frame_size, plan_frames, video_tokens
from stts_vllm.media.geometry import VisionGeometry

QWEN2_5 = VisionGeometry()  # 14 px patches, each frame's area bounded
QWEN3 = VisionGeometry(
    patch_size=16,
    min_pixels=4096,
    max_pixels=64 * 192 * 256,
    per_video_pixels=True,
    timestamped=True,
)
SIZE = (56, 56)


def _plan(duration: float, frame_count: int | None = None, **options: Any):
    settings: dict[str, Any] = {
        "fps": 2.0,
        "num_frames": None,
        "min_frames": 4,
        "max_frames": 64,
        "keep_ratio": 1.0,
        "test_time_scaling": True,
    }
    return plan_frames(duration, frame_count, SIZE, **(settings | options))


def test_plan_frames() -> None:
    common = {"fps": 2.0, "num_frames": None, "min_frames": 4, "max_frames": 64}
    plan = plan_frames(10.0, 40, (56, 56), keep_ratio=1.0, test_time_scaling=True, **common)
    assert plan.num_frames == 20 and not plan.test_time_scaled
    scaled = plan_frames(10.0, 400, (56, 56), keep_ratio=0.5, test_time_scaling=True, **common)
    assert scaled.num_frames == 40 and scaled.test_time_scaled
    capped = plan_frames(100.0, 4000, (56, 56), keep_ratio=0.3, test_time_scaling=True, **common)
    assert capped.num_frames == 64
    short = plan_frames(1.0, 3, (56, 56), keep_ratio=1.0, test_time_scaling=False, **common)
    assert short.num_frames == 3  # never more than the video has
    assert plan.times == sorted(plan.times) and 0 < plan.times[0] < plan.times[-1] < 10


@pytest.mark.parametrize(
    ("duration", "options", "frames"),
    [
        (10.0, {}, 20),  # fps x duration
        (10.2, {}, 21),  # rounded up: the last part of the video is sampled too
        (10.0, {"fps": 0.5}, 5),
        (1.0, {}, 4),  # at least min_frames
        (1000.0, {}, 64),  # at most max_frames
        (1000.0, {"max_frames": 6}, 6),
        (10.0, {"num_frames": 8}, 8),  # num_frames wins over fps
        (1.0, {"num_frames": 2}, 2),  # and over min_frames
        (0.0, {"min_frames": 0}, 1),  # never no frame at all
    ],
)
def test_frame_counts(duration: float, options: dict, frames: int) -> None:
    plan = _plan(duration, **options)
    assert plan.num_frames == len(plan.times) == frames
    assert plan.size == SIZE and not plan.test_time_scaled


def test_frames_are_the_middles_of_equal_spans() -> None:
    assert _plan(10.0, num_frames=5).times == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert _plan(2.0, num_frames=4).times == [0.25, 0.75, 1.25, 1.75]
    # a video whose duration is unknown (0) or nonsensical: every frame from its start
    assert _plan(0.0, num_frames=3).times == [0.0, 0.0, 0.0]
    assert _plan(-1.0, num_frames=2).times == [0.0, 0.0]


@pytest.mark.parametrize("frame_count", [None, 0])
def test_an_unknown_frame_count_bounds_nothing(frame_count: int | None) -> None:
    assert _plan(10.0, frame_count).num_frames == 20


def test_never_more_frames_than_the_video_has() -> None:
    assert _plan(10.0, 12).num_frames == 12
    assert _plan(10.0, 12, num_frames=30).num_frames == 12
    assert _plan(10.0, 12, keep_ratio=0.25).num_frames == 12


@pytest.mark.parametrize(
    ("keep", "frames"),
    [(0.5, 40), (0.25, 64), (0.3, 64), (0.8, 25), (1.0, 20)],
)
def test_test_time_scaling_takes_about_one_over_keep_times_the_frames(
    keep: float, frames: int
) -> None:
    plan = _plan(10.0, keep_ratio=keep)
    assert plan.num_frames == min(64, math.ceil(20 / keep)) == frames
    assert plan.test_time_scaled == (keep < 1.0)


def test_test_time_scaling_applies_to_an_asked_frame_count_too() -> None:
    scaled = _plan(10.0, num_frames=8, keep_ratio=0.5)
    assert scaled.num_frames == 16 and scaled.test_time_scaled
    assert _plan(10.0, num_frames=8, keep_ratio=0.5, max_frames=10).num_frames == 10


def test_without_test_time_scaling_pruning_leaves_the_plan_alone() -> None:
    plain = _plan(10.0, keep_ratio=0.5, test_time_scaling=False)
    assert plain.num_frames == 20 and not plain.test_time_scaled


def test_video_tokens_match_the_count_function() -> None:
    grid, before, after = video_tokens(20, (224, 224), VisionGeometry(), 0.5)
    assert grid == (10, 8, 8) and before == 640 and after == 320
    grid, before, after = video_tokens(7, (56, 84), VisionGeometry(), 1.0)
    assert grid == (4, 2, 3) and before == after == 24


@pytest.mark.parametrize(
    ("frames", "size", "geometry", "grid"),
    [
        (1, (56, 56), QWEN2_5, (1, 2, 2)),  # one frame still makes a whole temporal step
        (3, (56, 56), QWEN2_5, (2, 2, 2)),
        (8, (60, 90), QWEN2_5, (4, 2, 3)),  # units of 28 px: a partial unit is not one
        (8, (192, 256), QWEN3, (4, 6, 8)),  # units of 32 px
    ],
)
def test_video_token_grid(
    frames: int, size: tuple[int, int], geometry: VisionGeometry, grid: tuple[int, int, int]
) -> None:
    got, before, after = video_tokens(frames, size, geometry, 1.0)
    assert got == grid and before == after == math.prod(grid)


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.5, 0.77, 1.0])
def test_pruned_video_tokens(keep: float) -> None:
    (steps, h, w), before, after = video_tokens(16, (112, 168), QWEN2_5, keep)
    assert (steps, h, w) == (8, 4, 6)
    assert after == retained_count(steps, h * w, keep)
    assert h * w <= after <= before  # the first step is always kept whole
    assert after == max(h * w, math.floor(keep * before + 0.5))


def test_geometry_factor_is_patch_times_merge() -> None:
    assert QWEN2_5.factor == 28 and QWEN3.factor == 32


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [
        (480, 640, (364, 504)),  # over max_pixels: scaled down to fit, aspect about kept
        (28, 28, (56, 56)),  # under min_pixels: scaled up
        (224, 224, (224, 224)),  # within the budget, multiples already: unchanged
        (71, 97, (84, 84)),  # rounded to the nearest multiples
    ],
)
def test_frame_size_per_frame_budget(height: int, width: int, size: tuple[int, int]) -> None:
    got = frame_size(height, width, QWEN2_5)
    assert got == size
    assert got[0] % 28 == 0 and got[1] % 28 == 0
    assert QWEN2_5.min_pixels <= got[0] * got[1] <= QWEN2_5.max_pixels
    # the budget is per frame: how many frames there are does not matter
    assert frame_size(height, width, QWEN2_5, num_frames=64) == got


def test_frame_size_per_video_budget_shrinks_frames_as_they_multiply() -> None:
    sizes = {n: frame_size(480, 640, QWEN3, num_frames=n) for n in (1, 2, 8, 64, 256)}
    assert sizes[1] == sizes[2] == sizes[8] == (480, 640)  # within the volume: unchanged
    assert sizes[64] == (192, 256) and sizes[256] == (96, 128)
    for n, (h, w) in sizes.items():
        assert h % 32 == 0 and w % 32 == 0
        assert max(n, 2) * h * w <= QWEN3.max_pixels
        assert abs(h / w - 480 / 640) < 0.1
