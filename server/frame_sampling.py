"""Which frames to decode, at what size, and what that costs in video tokens.

Test-time scaling (paper §4): with keep ratio r < 1, sample about 1/r times the frames the
unpruned model would take, so the LLM sees about the same number of video tokens as before,
spread over more moments of the video.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stts_vllm.core import retained_count


@dataclass(frozen=True)
class VisionGeometry:
    """What the served model's processor does to frames (read from its processor config).

    Qwen2.5-VL bounds each frame's area by `min_pixels..max_pixels`; Qwen3-VL bounds a whole
    video's volume (frames x height x width) and writes each temporal step's time into the
    prompt (`per_video_pixels`, `timestamped`)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 200704
    per_video_pixels: bool = False
    timestamped: bool = False

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class FramePlan:
    times: list[float]
    size: tuple[int, int]  # (height, width) every frame is scaled to
    test_time_scaled: bool

    @property
    def num_frames(self) -> int:
        return len(self.times)


def frame_size(
    height: int, width: int, geometry: VisionGeometry, num_frames: int = 1
) -> tuple[int, int]:
    """The model processor's own `smart_resize`: multiples of patch x merge, area (or, for
    Qwen3-VL, the video's volume of `num_frames` frames) within the pixel budget, aspect
    kept. Frames decoded at this size pass the processor unchanged."""
    if geometry.per_video_pixels:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as resize

        return resize(
            max(num_frames, geometry.temporal_patch_size),
            height,
            width,
            temporal_factor=geometry.temporal_patch_size,
            factor=geometry.factor,
            min_pixels=geometry.min_pixels,
            max_pixels=geometry.max_pixels,
        )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    return smart_resize(
        height,
        width,
        factor=geometry.factor,
        min_pixels=geometry.min_pixels,
        max_pixels=geometry.max_pixels,
    )


def plan_frames(
    duration: float,
    frame_count: int | None,
    size: tuple[int, int],
    *,
    fps: float,
    num_frames: int | None,
    min_frames: int,
    max_frames: int,
    keep_ratio: float,
    test_time_scaling: bool,
) -> FramePlan:
    """Uniform frame times: `num_frames` if given, else `fps` x duration within
    [min_frames, max_frames]; then test-time scaling; never more than the video has."""
    if num_frames is not None:
        count = num_frames
    else:
        count = min(max_frames, max(min_frames, math.ceil(duration * fps)))
    scaled = test_time_scaling and keep_ratio < 1.0
    if scaled:
        count = min(max_frames, math.ceil(count / keep_ratio))
    if frame_count:
        count = min(count, frame_count)
    count = max(1, count)
    span = duration if duration > 0 else 0.0
    times = [span * (i + 0.5) / count for i in range(count)]
    return FramePlan(times=times, size=size, test_time_scaled=scaled)


def video_tokens(
    num_frames: int, size: tuple[int, int], geometry: VisionGeometry, keep_ratio: float
) -> tuple[tuple[int, int, int], int, int]:
    """(grid in units, tokens before pruning, tokens after) for frames of `size`."""
    steps = math.ceil(num_frames / geometry.temporal_patch_size)
    units_h, units_w = size[0] // geometry.factor, size[1] // geometry.factor
    before = steps * units_h * units_w
    return (steps, units_h, units_w), before, retained_count(steps, units_h * units_w, keep_ratio)
