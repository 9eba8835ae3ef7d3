"""vLLM's offline video input for Qwen2.5-VL: frames already sampled, plus the metadata its
processor needs (fps drives the M-RoPE time positions). One place for server, eval, bench."""

from __future__ import annotations

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
