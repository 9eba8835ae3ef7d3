"""Which image parts of a message are the frames of one video (`--frames-as-video`).

Evaluation harnesses and cookbooks often decode a video on the client and send its frames as
`image_url` parts, sometimes with a timestamp text part before each frame (lmms-eval's
default mode, and its Qwen3-VL message format: `<12.5 seconds>`). Served as images, such a
message is refused (media per message) or never pruned; read as one video it takes the same
frame plan, limits and STTS pruning as an uploaded video, and the client's timestamps become
the frames' times (Qwen3-VL prints them per temporal step).

A *run* is a stretch of parts of the form `(timestamp? image)+`. The policy says which runs
become videos: `off` none, `always` every run, `auto` runs of at least `min_images` images
(fewer, or images broken by ordinary text, stay images).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from server.chat_request import TEXT_PARTS
from server.errors import APIError

FramesAsVideo = Literal["off", "auto", "always"]

# `<12.5 seconds>`, `<12.5s>`, `12.5s`, `12.5 sec`: a text part that is only a frame's time.
_TIMESTAMP = re.compile(r"^\s*<?\s*([-+]?\d+(?:\.\d+)?)\s*(?:s|secs?|seconds?)\s*>?\s*$", re.I)


def frame_timestamp(part: Any) -> float | None:
    """The time a text part states, if that is all it says."""
    if isinstance(part, str):
        text: Any = part
    elif isinstance(part, dict) and part.get("type") in TEXT_PARTS:
        text = part.get(TEXT_PARTS[part["type"]])
    else:
        return None
    match = _TIMESTAMP.match(text) if isinstance(text, str) else None
    return float(match.group(1)) if match else None


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image_url"


@dataclass(frozen=True)
class FrameRun:
    """Parts `start..stop-1` of a message are one video: the images at `images`, each at the
    time in `times` (None: no timestamps given; the frames are spaced at the request's fps)."""

    start: int
    stop: int
    images: tuple[int, ...]
    times: tuple[float, ...] | None


def frame_runs(
    parts: Sequence[Any], policy: FramesAsVideo, min_images: int, where: str
) -> list[FrameRun]:
    """The runs of `parts` that the policy makes videos, in order. Timestamps must be given
    for every frame of a run or none, be non-negative and never go backwards (a repeated
    time, as lmms-eval sends to pad a clip to an even frame count, is fine): otherwise a 400
    names the part."""
    if policy == "off":
        return []
    least = 1 if policy == "always" else min_images
    runs: list[FrameRun] = []
    i = 0
    while i < len(parts):
        images: list[int] = []
        stamps: list[tuple[int, float] | None] = []
        j = i
        while j < len(parts):
            time = frame_timestamp(parts[j])
            k = j + (time is not None)
            if k >= len(parts) or not _is_image(parts[k]):
                break
            images.append(k)
            stamps.append(None if time is None else (j, time))
            j = k + 1
        if not images:
            i += 1
            continue
        if len(images) >= least:
            runs.append(FrameRun(i, j, tuple(images), _times(stamps, images, where)))
        i = j
    return runs


def _times(
    stamps: list[tuple[int, float] | None], images: list[int], where: str
) -> tuple[float, ...] | None:
    given = [s for s in stamps if s is not None]
    if not given:
        return None
    if len(given) != len(stamps):
        missing = next(images[n] for n, s in enumerate(stamps) if s is None)
        raise APIError(
            400,
            f"frame {where}.{missing} has no timestamp where the other frames of its video "
            "have one: give every frame a timestamp part, or none",
            param=f"{where}.{missing}",
            code="invalid_request",
        )
    previous = 0.0
    for index, time in given:
        if time < 0:
            raise APIError(
                400,
                f"frame timestamp {time:g} s at {where}.{index} is negative",
                param=f"{where}.{index}",
                code="invalid_request",
            )
        if time < previous:
            raise APIError(
                400,
                f"frame timestamp {time:g} s at {where}.{index} goes back in time (the frame "
                f"before it is at {previous:g} s)",
                param=f"{where}.{index}",
                code="invalid_request",
            )
        previous = time
    return tuple(time for _, time in given)
