"""A video file to the frames the model is given: probe, plan, decode, and the metadata vLLM's
processor needs. The server runs these steps itself (cached, budgeted, on its decode pool);
training calls `read_video`, so a record trains on the frames the server would serve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stts_vllm.media.frames import FramePlan, plan_video
from stts_vllm.media.geometry import VisionGeometry
from stts_vllm.media.sampling import FrameSampling
from stts_vllm.video_inputs import timed_video_metadata, video_metadata

if TYPE_CHECKING:  # PyAV is only needed to decode
    from stts_vllm.media.decode import DecodeBudget, VideoSource


@dataclass(frozen=True)
class VideoFrames:
    frames: np.ndarray  # [T, H, W, 3] uint8, at the plan's size
    times: list[float]  # seconds of each decoded frame
    fps: float  # the sampled frames' rate
    duration: float
    plan: FramePlan


def sampled_fps(plan: FramePlan, fallback: float) -> float:
    """The rate of the planned frames (Qwen2.5-VL's time positions follow it); one frame, or
    frames at one instant, have none: `fallback`."""
    span = plan.times[-1] - plan.times[0] if plan.num_frames > 1 else 0.0
    return (plan.num_frames - 1) / span if span > 0 else fallback


def frames_metadata(
    times: list[float], fps: float, duration: float | None, geometry: VisionGeometry
) -> dict[str, Any]:
    """Qwen3-VL prints each step's time: the real decode times. Qwen2.5-VL's positions need a
    frame rate: that of the sampled frames."""
    if geometry.timestamped:
        return timed_video_metadata(times, duration or times[-1], backend="pyav")
    return video_metadata(len(times), fps, backend="pyav")


def read_video(
    source: VideoSource,
    geometry: VisionGeometry,
    sampling: FrameSampling,
    *,
    num_frames: int | None = None,
    keep_ratio: float = 1.0,
    test_time_scaling: bool = False,
    budget: DecodeBudget | None = None,
) -> VideoFrames:
    """Probe, plan and decode one video, as the server does for a request with these settings
    (test-time scaling off unless asked). Raises `MediaError` for a file it cannot use."""
    from stts_vllm.media.decode import decode, probe

    info = probe(source, budget)
    plan = plan_video(
        info,
        geometry,
        sampling,
        num_frames=num_frames,
        keep_ratio=keep_ratio,
        test_time_scaling=test_time_scaling,
    )
    decoded = decode(source, plan.times, plan.size, info, budget=budget)
    fps = sampled_fps(plan, sampling.fps)
    return VideoFrames(decoded.frames, decoded.times, fps, info.duration, plan)
