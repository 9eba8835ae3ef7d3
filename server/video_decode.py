"""Video decoding with PyAV: probe, then decode only the frames a sampling plan needs.

Blocking (FFmpeg); callers run it in a worker thread. Every failure is a `MediaError` with a
message a client can act on: nothing FFmpeg raises escapes as a crash.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from server.media_errors import MediaError

SEEK_GAP_SECONDS = 3.0
"""Farther than this from the current decode position, seeking beats decoding through."""

CONTAINER_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,mpegts,flv,mpeg,ogg"
"""FFmpeg demuxers we open (its `format_whitelist`). Anything else is refused before its
demuxer reads a byte past the probe: playlists and scripts (hls, concat, image2) would open
other files or URLs, text-ish demuxers (tty) turn any file into "video", and raw streams
(yuv4mpegpipe, h264) are not uploads we mean to serve."""

PATH_PROTOCOLS = "file"
"""The only protocol a file on disk may use, for itself or anything its demuxer opens."""

NO_PROTOCOLS = "none"
"""Bytes need no protocol at all (PyAV reads them itself): a name no protocol has, so a
demuxer trying to open anything else fails."""


@dataclass(frozen=True)
class VideoInfo:
    duration: float
    fps: float
    frame_count: int | None
    width: int  # as displayed (after rotation)
    height: int
    rotation: int


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # [T, H, W, 3] uint8
    times: list[float]  # seconds of each returned frame
    info: VideoInfo


VideoSource = Path | bytes
"""A file on disk, or the bytes of one (uploads arrive as data URLs)."""


def _open(source: VideoSource) -> av.container.InputContainer:
    """Open with only our demuxers, and no protocol but a file's own."""
    if isinstance(source, bytes):
        target: io.BytesIO | str = io.BytesIO(source)
        protocols = NO_PROTOCOLS
    else:
        target, protocols = str(source), PATH_PROTOCOLS
    try:
        return av.open(
            target,
            mode="r",
            metadata_errors="ignore",
            container_options={
                "format_whitelist": CONTAINER_FORMATS,
                "protocol_whitelist": protocols,
            },
        )
    except av.error.ArgumentError as exc:  # EINVAL: what FFmpeg answers off the whitelist
        raise MediaError(
            "invalid_video",
            "not a readable video file (unsupported container: accepted are mp4/mov, "
            "matroska/webm, avi, gif, mpeg-ts, flv, mpeg-ps and ogg)",
        ) from exc
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError("invalid_video", f"not a readable video file ({exc})") from exc


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    streams = [s for s in container.streams.video if s.codec_context is not None]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        raise MediaError("no_video_stream", f"file has no video stream (found: {', '.join(kinds)})")
    stream = streams[0]
    stream.thread_type = "AUTO"
    return stream


def _first_frame_rotation(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> int:
    """Display rotation (degrees counter-clockwise, from the display matrix) of the first
    frame; phones record portrait video as rotated landscape frames."""
    for frame in container.decode(stream):
        return int(frame.rotation or 0) % 360
    raise MediaError("empty_video", "video has no decodable frames")


def _probe(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> VideoInfo:
    fps = float(stream.average_rate or stream.guessed_rate or 0.0) or 25.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    else:
        duration = float(stream.frames) / fps if stream.frames else 0.0
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise MediaError("invalid_video", "video stream has no frame size")
    try:
        rotation = _first_frame_rotation(container, stream)
    except (av.FFmpegError, ValueError) as exc:
        raise MediaError("invalid_video", f"video could not be decoded ({exc})") from exc
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(
        duration=max(duration, 0.0),
        fps=fps,
        frame_count=int(stream.frames) or None,
        width=width,
        height=height,
        rotation=rotation,
    )


def probe(path: VideoSource) -> VideoInfo:
    """Duration, rate, displayed size and rotation; decodes the first frame only."""
    with _open(path) as container:
        return _probe(container, _video_stream(container))


def _to_array(frame: av.VideoFrame, size: tuple[int, int], rotation: int) -> np.ndarray:
    """Scale with swscale straight to the target size (pre-rotation axes), then rotate."""
    height, width = size
    if rotation in (90, 270):
        height, width = width, height
    array = frame.to_ndarray(format="rgb24", width=width, height=height)
    turns = (rotation // 90) % 4  # display = the frame turned counter-clockwise
    return np.ascontiguousarray(np.rot90(array, turns)) if turns else array


def decode(
    path: VideoSource,
    times: list[float],
    size: tuple[int, int],
    info: VideoInfo,
) -> DecodedVideo:
    """Frames at-or-just-after each of `times` (sorted seconds), scaled to `size` (h, w).

    Decodes forward and seeks over gaps longer than `SEEK_GAP_SECONDS`; frame times come from
    timestamps, so variable frame rate is honoured. Targets past the real end (duration
    metadata can lie) repeat the last frame; a video with no decodable frame is an error.
    """
    with _open(path) as container:
        stream = _video_stream(container)
        start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        slack = 0.5 / info.fps  # a frame this close before a target is taken for it
        picked: list[np.ndarray] = []
        picked_times: list[float] = []
        tail: tuple[float, av.VideoFrame] | None = None  # the last frame decoded
        index = 0
        try:
            while index < len(times):
                if tail is not None and times[index] - tail[0] > SEEK_GAP_SECONDS:
                    offset = int((times[index] + start) / stream.time_base)
                    container.seek(offset, stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    t = (
                        frame.time - start
                        if frame.time is not None
                        else (tail[0] + 1.0 / info.fps if tail else 0.0)
                    )
                    tail = (t, frame)
                    if t + slack < times[index]:
                        continue
                    array = _to_array(frame, size, frame.rotation or info.rotation)
                    while index < len(times) and t + slack >= times[index]:
                        picked.append(array)
                        picked_times.append(t)
                        index += 1
                    if index == len(times) or times[index] - t > SEEK_GAP_SECONDS:
                        break  # done, or far enough to seek
                else:
                    break  # end of stream
        except (av.FFmpegError, ValueError) as exc:
            if tail is None:
                raise MediaError("invalid_video", f"video could not be decoded ({exc})") from exc
        if tail is None:
            raise MediaError("empty_video", "video has no decodable frames")
        if index < len(times):  # ran out of video: hold its last frame
            held = _to_array(tail[1], size, tail[1].rotation or info.rotation)
            picked.extend([held] * (len(times) - index))
            picked_times.extend([tail[0]] * (len(times) - index))
    return DecodedVideo(frames=np.stack(picked), times=picked_times, info=info)
