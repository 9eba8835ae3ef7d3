"""Video decoding with PyAV: probe, then decode only the frames a sampling plan needs.

Blocking (FFmpeg); callers run it in a worker thread. Every failure is a `MediaError` with a
message a client can act on: nothing FFmpeg raises escapes as a crash. The work is bounded: a
`DecodeBudget` caps the frames decoded and the time taken, and is checked between packets, and
seeks only ever move forward, so no file makes decoding cost much more than one pass over it.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from stts_vllm.media.errors import MediaError

SEEK_GAP_SECONDS = 3.0
"""Farther than this from the current decode position, seeking beats decoding through."""

CONTAINER_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,mpegts,flv,mpeg,ogg"
"""FFmpeg demuxers we open (its `format_whitelist`). Anything else is refused once FFmpeg
has probed the first bytes, before its demuxer opens: playlists and scripts (hls, concat,
image2) would open other files or URLs, text-ish demuxers (tty) turn any file into "video",
and raw streams (yuv4mpegpipe, h264) are not uploads we mean to serve."""

PATH_PROTOCOLS = "file"
"""The only protocol a file on disk may use, for itself or anything its demuxer opens."""

NO_PROTOCOLS = "none"
"""Bytes need no protocol at all (PyAV reads them itself): a name no protocol has, so a
demuxer trying to open anything else fails."""


class DecodeCancelled(Exception):
    """The caller gave up (the client went away): not a media error, so it is not answered
    as a 400; the caller maps it to a disconnect."""


@dataclass(frozen=True, slots=True)
class DecodeBudget:
    """How much work one video may cost, shared by its `probe` and `decode`.

    A pathological file (hours of tiny frames, a single keyframe, a deadline the client will
    not wait for) must not tie up a decode worker: the budget is checked between packets, so
    the work stops within one packet of a limit.
    """

    deadline: float | None = None
    """A `time.monotonic()` instant; opening, probing and decoding all stop there."""
    max_frames: int | None = None
    """Frames FFmpeg may decode for this video in total, sampled or skipped, including the
    probe's: the packets fed to the decoder, which is the work whatever comes out."""
    cancelled: threading.Event | None = None
    """Set by the caller when nobody wants the result any more."""
    started: float = field(default_factory=time.monotonic)
    """When the budget was made, so an overrun can say how long was allowed."""

    def check(self, frames: int = 0) -> None:
        """Raise if the caller gave up, `frames` decoded so far is over the cap, or time is up."""
        if self.cancelled is not None and self.cancelled.is_set():
            raise DecodeCancelled("decoding stopped: the request was cancelled")
        if self.max_frames is not None and frames > self.max_frames:
            raise MediaError(
                "decode_budget_exceeded",
                f"video needs more than {self.max_frames} decoded frames",
            )
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise self.timed_out()

    def timed_out(self) -> MediaError:
        """The error for a passed deadline, wherever it was noticed (here, or FFmpeg's
        interrupt callback while opening a file)."""
        assert self.deadline is not None
        allowed = max(self.deadline - self.started, 0.0)
        return MediaError("decode_budget_exceeded", f"decoding took longer than {allowed:.3g} s")


@dataclass(frozen=True)
class VideoInfo:
    duration: float
    fps: float
    frame_count: int | None
    width: int  # as displayed (after rotation)
    height: int
    rotation: int
    probe_frames: int = 0
    """Frames the probe decoded: a `DecodeBudget` spans probe and decode, so `decode` starts
    its count here."""


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # [T, H, W, 3] uint8
    times: list[float]  # seconds of each returned frame
    info: VideoInfo
    decoded_frames: int = 0
    """Frames this decode fed to FFmpeg (the probe's not included): the work it cost, which
    stays near one pass over the file however the targets are spread."""


VideoSource = Path | bytes
"""A file on disk, or the bytes of one (uploads arrive as data URLs)."""


def _open(source: VideoSource, budget: DecodeBudget | None) -> av.container.InputContainer:
    """Open with only our demuxers and no other protocol. For a file on disk the deadline
    also stops FFmpeg's open and stream analysis (which decodes a few frames we cannot
    count): its file I/O consults the interrupt callback PyAV's open timeout installs. Bytes
    have no I/O to wait on, and their analysis is bounded by FFmpeg's probesize."""
    if budget is not None:
        budget.check()
    if isinstance(source, bytes):
        target: io.BytesIO | str = io.BytesIO(source)
        protocols = NO_PROTOCOLS
    else:
        target, protocols = str(source), PATH_PROTOCOLS
    timeout = None
    if budget is not None and budget.deadline is not None:
        timeout = (max(budget.deadline - time.monotonic(), 0.0), None)
    try:
        return av.open(
            target,
            mode="r",
            metadata_errors="ignore",
            container_options={
                "format_whitelist": CONTAINER_FORMATS,
                "protocol_whitelist": protocols,
            },
            timeout=timeout,
        )
    except av.error.ExitError as exc:  # the interrupt callback: the deadline passed
        if budget is not None and budget.deadline is not None:
            raise budget.timed_out() from exc
        raise MediaError("invalid_video", f"not a readable video file ({exc})") from exc
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


class _Frames:
    """One video stream's frames in presentation order, with the work counted and the budget
    checked before each packet goes to the decoder."""

    def __init__(
        self,
        container: av.container.InputContainer,
        stream: av.video.stream.VideoStream,
        budget: DecodeBudget | None,
        spent: int = 0,
    ) -> None:
        self.container = container
        self.stream = stream
        self.budget = budget
        self.spent = spent  # counted against the budget (may include the probe's)
        self.decoded = 0  # fed to the decoder by this object

    def frames(self) -> Generator[av.VideoFrame, None, None]:
        """Decode from the current position on; a seek needs a new generator (the old one's
        frames are from before it), and only one may be live at a time."""
        for packet in self.container.demux(self.stream):
            if packet.size:  # the empty packets at the end only flush the decoder
                self.decoded += 1
                self.spent += 1
            if self.budget is not None:
                self.budget.check(self.spent)
            yield from packet.decode()


def _first_frame_rotation(frames: _Frames) -> int:
    """Display rotation (degrees counter-clockwise, from the display matrix) of the first
    frame; phones record portrait video as rotated landscape frames."""
    for frame in frames.frames():
        return int(frame.rotation or 0) % 360
    raise MediaError("empty_video", "video has no decodable frames")


def _probe(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    budget: DecodeBudget | None,
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
    frames = _Frames(container, stream, budget)
    try:
        rotation = _first_frame_rotation(frames)
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
        probe_frames=frames.decoded,
    )


def probe(source: VideoSource, budget: DecodeBudget | None = None) -> VideoInfo:
    """Duration, rate, displayed size and rotation; decodes up to the first frame only."""
    with _open(source, budget) as container:
        return _probe(container, _video_stream(container), budget)


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
    *,
    budget: DecodeBudget | None = None,
) -> DecodedVideo:
    """Frames at-or-just-after each of `times` (sorted seconds), scaled to `size` (h, w).

    Decodes forward and seeks over gaps longer than `SEEK_GAP_SECONDS`; frame times come from
    timestamps, so variable frame rate is honoured. Targets past the real end (duration
    metadata can lie) repeat the last frame; a video with no decodable frame is an error.

    A seek lands on the keyframe at or before its target. When that keyframe is at or behind
    the position already reached (one keyframe in a long file, or sparse ones), the seek only
    re-decodes what was passed, and every later one would too: after the first such seek the
    rest of the video is decoded straight through, the re-decoded frames skipped unconverted.
    So the work stays under one pass plus a GOP (`DecodedVideo.decoded_frames`), and `budget`
    (with `info.probe_frames` already spent) stops it if even that is too much.
    """
    with _open(path, budget) as container:
        stream = _video_stream(container)
        start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        slack = 0.5 / info.fps  # a frame this close before a target is taken for it
        picked: list[np.ndarray] = []
        picked_times: list[float] = []
        tail: tuple[float, av.VideoFrame] | None = None  # the last frame decoded
        source = _Frames(container, stream, budget, spent=info.probe_frames)
        frames = source.frames()
        may_seek = True  # until a seek fails to move forward, or timestamps are missing
        seeked_from: float | None = None  # the position a seek just left
        index = 0
        try:
            while index < len(times):
                if may_seek and tail is not None and times[index] - tail[0] > SEEK_GAP_SECONDS:
                    offset = int((times[index] + start) / stream.time_base)
                    try:
                        container.seek(offset, stream=stream, backward=True, any_frame=False)
                    except (av.FFmpegError, ValueError):
                        may_seek = False  # not seekable: decode on from where it stopped
                    else:
                        frames.close()  # its frames are from before the seek
                        frames = source.frames()
                        seeked_from = tail[0]
                for frame in frames:
                    if frame.time is None:
                        may_seek = False  # no timestamps: a seek's landing cannot be told
                    t = (
                        frame.time - start
                        if frame.time is not None
                        else (tail[0] + 1.0 / info.fps if tail else 0.0)
                    )
                    if seeked_from is not None:
                        may_seek = may_seek and t > seeked_from
                        seeked_from = None
                    tail = (t, frame)
                    if t + slack < times[index]:
                        continue  # passed over (or re-decoded after a useless seek)
                    array = _to_array(frame, size, frame.rotation or info.rotation)
                    while index < len(times) and t + slack >= times[index]:
                        picked.append(array)
                        picked_times.append(t)
                        index += 1
                    if index == len(times) or (may_seek and times[index] - t > SEEK_GAP_SECONDS):
                        break  # done, or far enough to seek
                else:
                    break  # end of stream
        except (av.FFmpegError, ValueError) as exc:
            if tail is None:
                raise MediaError("invalid_video", f"video could not be decoded ({exc})") from exc
        finally:
            frames.close()
        if tail is None:
            raise MediaError("empty_video", "video has no decodable frames")
        if index < len(times):  # ran out of video: hold its last frame
            held = _to_array(tail[1], size, tail[1].rotation or info.rotation)
            picked.extend([held] * (len(times) - index))
            picked_times.extend([tail[0]] * (len(times) - index))
    return DecodedVideo(
        frames=np.stack(picked), times=picked_times, info=info, decoded_frames=source.decoded
    )
