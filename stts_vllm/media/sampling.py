"""How many frames a video gets, as one small value both the server's settings and training
take their defaults from (no heavy imports: command lines read it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FrameSampling:
    """How many frames a video gets: `fps` x its duration within `[min_frames, max_frames]`
    (the server's `--fps`, `--min-frames`, `--max-frames`, whose defaults these are)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 256
