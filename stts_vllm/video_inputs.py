"""vLLM's offline video input: frames already sampled, plus the metadata its processor needs
(Qwen2.5-VL: fps drives the M-RoPE time positions; Qwen3-VL: frame times become the
`<t seconds>` text of each step). One place for server, eval, bench."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def video_metadata(num_frames: int, fps: float, backend: str = "opencv") -> dict[str, Any]:
    """Metadata for `num_frames` frames at `fps`, telling vLLM not to resample them."""
    return {
        "fps": fps,
        "duration": num_frames / fps,
        "total_num_frames": num_frames,
        "frames_indices": list(range(num_frames)),
        "video_backend": backend,
        "do_sample_frames": False,
    }


TIMESTAMP_RATE = 1000
"""`frames_indices` in milliseconds: see `timed_video_metadata`."""


def timed_video_metadata(
    times: Sequence[float], duration: float, backend: str = "opencv"
) -> dict[str, Any]:
    """Metadata for frames decoded at `times` (seconds), for prompts that print each temporal
    step's time (Qwen3-VL): vLLM's processor takes a step's timestamp as the mean of its
    frames' `frames_indices / fps`, so indices in milliseconds at fps 1000 carry the real
    decode times, however unevenly spaced (variable frame rate, seeks to keyframes)."""
    indices = [round(t * TIMESTAMP_RATE) for t in times]
    return {
        "fps": float(TIMESTAMP_RATE),
        "duration": duration,
        "total_num_frames": max(round(duration * TIMESTAMP_RATE), indices[-1] + 1),
        "frames_indices": indices,
        "video_backend": backend,
        "do_sample_frames": False,
    }
