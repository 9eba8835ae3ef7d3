"""Which frames to decode, at what size, and what that costs in video tokens.

Test-time scaling (paper §4): with keep ratio r < 1, sample about 1/r times the frames the
unpruned model would take, so the LLM sees about the same number of video tokens as before,
spread over more moments of the video.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stts_vllm.core import retained_count
from stts_vllm.media.errors import MediaError
from stts_vllm.media.geometry import VisionGeometry
from stts_vllm.media.sampling import FrameSampling

if TYPE_CHECKING:  # PyAV is only needed to decode
    from stts_vllm.media.decode import VideoInfo


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


def plan_video(
    info: VideoInfo,
    geometry: VisionGeometry,
    sampling: FrameSampling,
    *,
    num_frames: int | None = None,
    keep_ratio: float = 1.0,
    test_time_scaling: bool = False,
) -> FramePlan:
    """The frames of a probed video and their size: what the server decodes for a request
    and what training decodes for a record with the same settings."""
    plan = plan_frames(
        info.duration,
        info.frame_count,
        (0, 0),  # sized below: Qwen3-VL's pixel budget depends on the frame count
        fps=sampling.fps,
        num_frames=num_frames,
        min_frames=sampling.min_frames,
        max_frames=sampling.max_frames,
        keep_ratio=keep_ratio,
        test_time_scaling=test_time_scaling,
    )
    try:
        size = frame_size(info.height, info.width, geometry, plan.num_frames)
    except ValueError as exc:
        raise MediaError("invalid_video", str(exc)) from exc
    return dataclasses.replace(plan, size=size)
