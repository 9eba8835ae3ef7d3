"""PyAV decoding, on videos generated here (no server needed); frame planning is in
`test_frame_sampling.py`."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from media import audio_only_m4a, encode_keyframed_video, encode_video, level_video

from stts_vllm.media.decode import DecodeBudget, DecodeCancelled, DecodedVideo, decode, probe
from stts_vllm.media.errors import MediaError
from stts_vllm.media.frames import frame_size
from stts_vllm.media.geometry import VisionGeometry

FPS = 8


def _level(frame) -> float:
    """Mean gray of the lower-right part (away from the dark corner)."""
    h, w = frame.shape[:2]
    return float(frame[h // 2 :, w // 2 :].mean())


@pytest.mark.parametrize(
    ("container", "codec"),
    [
        ("mp4", "libx264"),
        ("webm", "libvpx-vp9"),
        ("matroska", "libx264"),
        ("mov", "libx264"),
        ("gif", "gif"),
    ],
)
def test_containers_decode_the_right_frames(container: str, codec: str) -> None:
    data = encode_video(level_video(40), FPS, container=container, codec=codec)
    info = probe(data)
    assert info.duration == pytest.approx(5.0, abs=0.2)
    assert (info.width, info.height) == (96, 64)
    times = [0.0, 1.0, 2.5, 4.5]
    decoded = decode(data, times, (56, 84), info)
    assert decoded.frames.shape == (4, 56, 84, 3)
    for frame, t in zip(decoded.frames, times, strict=True):
        expected = 16 + 4 * round(t * FPS)
        assert abs(_level(frame) - expected) < 6, (t, _level(frame), expected)


def test_sparse_plan_seeks_and_holds_order() -> None:
    """A long video sampled sparsely: far-apart targets, each frame where a full pass has it."""
    data = encode_video(level_video(60 * 2, 32, 48), 2)  # 60 s at 2 fps, a single keyframe
    info = probe(data)
    times = [1.0, 20.0, 40.0, 59.0]
    decoded = decode(data, times, (28, 56), info)
    levels = [_level(f) for f in decoded.frames]
    expected = [min(255, 16 + 4 * round(t * 2)) for t in times]
    assert all(abs(a - b) < 6 for a, b in zip(levels, expected, strict=True)), levels


def test_rotation_metadata_is_honoured() -> None:
    data = encode_video(level_video(8, 64, 96), FPS, rotation=90)
    info = probe(data)
    assert (info.width, info.height, info.rotation) == (64, 96, 90)
    decoded = decode(data, [0.0], (96, 64), info)
    frame = decoded.frames[0]
    assert frame.shape == (96, 64, 3)
    # the dark top-left corner of the stored frame shows at the bottom-left after a
    # counter-clockwise turn
    assert frame[-10:, :8].mean() < 8 and frame[:10, :8].mean() > 12


def test_variable_frame_rate_uses_timestamps() -> None:
    times = [0.0, 0.1, 0.2, 2.0, 2.1, 4.0]  # a pause between frames 2 and 3
    data = encode_video(level_video(6), 10, container="matroska", times=times)
    info = probe(data)
    decoded = decode(data, [1.0, 3.0, 4.0], (56, 84), info)
    levels = [_level(f) for f in decoded.frames]
    assert abs(levels[0] - (16 + 4 * 3)) < 6  # at 1.0 s the next frame is the one at 2.0 s
    assert abs(levels[1] - (16 + 4 * 5)) < 6
    assert abs(levels[2] - (16 + 4 * 5)) < 6


def test_plan_past_the_end_holds_the_last_frame() -> None:
    data = encode_video(level_video(8), FPS)
    info = probe(data)
    decoded = decode(data, [0.5, 30.0], (56, 84), info)
    assert decoded.frames.shape[0] == 2
    assert abs(_level(decoded.frames[1]) - (16 + 4 * 7)) < 6


def test_odd_sizes() -> None:
    data = encode_video(
        level_video(6, 71, 97), FPS, container="matroska", codec="ffv1", pix_fmt="yuv444p"
    )
    info = probe(data)
    size = frame_size(info.height, info.width, VisionGeometry())
    assert size[0] % 28 == 0 and size[1] % 28 == 0
    assert decode(data, [0.1], size, info).frames.shape[1:3] == size


@pytest.mark.parametrize(
    ("container", "codec"),
    [("avi", "mpeg4"), ("mpegts", "libx264"), ("flv", "flv"), ("mpeg", "mpeg2video")],
)
def test_other_accepted_containers(container: str, codec: str) -> None:
    """The rest of the demuxer whitelist that can be written here (ogg needs libtheora)."""
    data = encode_video(level_video(40), FPS, container=container, codec=codec)
    info = probe(data)
    times = [0.0, 1.0, 2.5, 4.5]
    decoded = decode(data, times, (56, 84), info)
    for frame, t in zip(decoded.frames, times, strict=True):
        expected = 16 + 4 * round(t * FPS)
        assert abs(_level(frame) - expected) < 6, (t, _level(frame), expected)


def test_a_file_on_disk_opens(tmp_path: Path) -> None:
    """Paths open through FFmpeg's file protocol, the only one allowed them."""
    path = tmp_path / "upload"
    path.write_bytes(encode_video(level_video(16), FPS))
    info = probe(path)
    assert decode(path, [1.0], (56, 84), info).frames.shape == (1, 56, 84, 3)


@pytest.mark.parametrize(
    ("container", "codec"),
    [("yuv4mpegpipe", "rawvideo"), ("h264", "libx264"), ("nut", "mpeg4")],
)
def test_unlisted_containers_are_refused(container: str, codec: str) -> None:
    data = encode_video(level_video(4), FPS, container=container, codec=codec)
    with av.open(io.BytesIO(data)) as readable:  # FFmpeg itself reads it
        assert readable.streams.video
    with pytest.raises(MediaError) as error:
        probe(data)
    assert error.value.code == "invalid_video" and error.value.status == 400
    assert "unsupported container" in error.value.message


def _playlist_files(root: Path) -> dict[str, Path]:
    """Files FFmpeg would open as a video by reading other files (or URLs) they name, and
    text it would render as one."""
    (root / "segment.ts").write_bytes(encode_video(level_video(8), FPS, container="mpegts"))
    files = {
        "hls": (
            "list.m3u8",
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1,\nsegment.ts\n#EXT-X-ENDLIST\n",
        ),
        "concat": ("list.txt", "ffconcat version 1.0\nfile segment.ts\n"),
        "tty": ("notes.txt", "hello, this is not a video\n" * 50),
    }
    for name, text in files.values():
        (root / name).write_text(text)
    return {kind: root / name for kind, (name, _) in files.items()}


@pytest.mark.parametrize("kind", ["hls", "concat", "tty"])
def test_playlists_and_text_on_disk_are_refused(tmp_path: Path, kind: str) -> None:
    path = _playlist_files(tmp_path)[kind]
    with av.open(str(path)) as readable:  # FFmpeg itself opens it as video
        assert readable.streams.video
    with pytest.raises(MediaError) as error:
        probe(path)
    assert error.value.code == "invalid_video"
    assert "unsupported container" in error.value.message


SECONDS = 60
RATE = 10


@pytest.fixture(scope="module")
def single_keyframe() -> bytes:
    data = encode_keyframed_video(level_video(SECONDS * RATE, 32, 48), RATE)
    with av.open(io.BytesIO(data)) as container:
        keyframes = [p.is_keyframe for p in container.demux(video=0) if p.size]
    assert len(keyframes) == SECONDS * RATE and keyframes.index(True) == 0 and sum(keyframes) == 1
    return data


def _assert_a_full_pass_picks(data: bytes, times: list[float], decoded: DecodedVideo) -> None:
    """The frames (and times) a plain PyAV pass from start to end picks for `times`: the
    first frame at or just after each (the slack), the last one past the end."""
    height, width = decoded.frames.shape[1:3]
    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(video=0))
    slack = 0.5 / decoded.info.fps
    for t, got_t, got in zip(times, decoded.times, decoded.frames, strict=True):
        frame = next((f for f in frames if f.time + slack >= t), frames[-1])
        assert got_t == pytest.approx(frame.time), t
        expected = frame.to_ndarray(format="rgb24", width=width, height=height)
        assert np.array_equal(got, expected), t


def test_far_apart_targets_in_a_single_keyframe_video_cost_one_pass(single_keyframe) -> None:
    """Every seek in it lands back on the first frame: each of these targets used to
    re-decode the video from the start (about 4,500 frames in all); now the first useless
    seek re-decodes what the decoder had been fed (its frame threads, at most 16 or so) and
    the rest is one pass."""
    info = probe(single_keyframe)
    assert info.frame_count == SECONDS * RATE
    times = [0.05 + 4.0 * i for i in range(15)] + [SECONDS - 0.05]
    budget = DecodeBudget(max_frames=info.probe_frames + SECONDS * RATE + 24)
    decoded = decode(single_keyframe, times, (32, 48), info, budget=budget)
    assert decoded.decoded_frames <= SECONDS * RATE + 24, decoded.decoded_frames
    _assert_a_full_pass_picks(single_keyframe, times, decoded)


def test_seeks_that_move_forward_skip_decoding() -> None:
    """A keyframe every second: far targets are reached by seeking, so most of the file is
    never decoded (a GOP and the decoder's frame threads per target), and the frames are
    those a full pass picks."""
    data = encode_keyframed_video(level_video(SECONDS * RATE, 32, 48), RATE, keyframe_every=RATE)
    info = probe(data)
    times = [1.0, 20.0, 40.0, 59.0]
    decoded = decode(data, times, (32, 48), info)
    assert decoded.decoded_frames <= SECONDS * RATE // 4, decoded.decoded_frames
    _assert_a_full_pass_picks(data, times, decoded)


def test_the_frame_cap_stops_decoding(single_keyframe) -> None:
    info = probe(single_keyframe, DecodeBudget(max_frames=100))
    assert 0 < info.probe_frames <= 100
    with pytest.raises(MediaError) as error:
        decode(single_keyframe, [50.0], (32, 48), info, budget=DecodeBudget(max_frames=100))
    assert (error.value.code, error.value.status) == ("decode_budget_exceeded", 400)
    assert "more than 100 decoded frames" in error.value.message
    with pytest.raises(MediaError, match="more than 0 decoded frames"):
        probe(single_keyframe, DecodeBudget(max_frames=0))


def test_a_past_deadline_stops_probe_and_decode(single_keyframe) -> None:
    info = probe(single_keyframe)
    late = DecodeBudget(deadline=time.monotonic() - 1.0)
    for work in (
        lambda: probe(single_keyframe, late),
        lambda: decode(single_keyframe, [1.0], (32, 48), info, budget=late),
    ):
        with pytest.raises(MediaError) as error:
            work()
        assert error.value.code == "decode_budget_exceeded"
        assert "decoding took longer than" in error.value.message


def test_a_deadline_passing_while_opening_a_file_stops_it(tmp_path: Path, single_keyframe) -> None:
    """FFmpeg's interrupt callback (PyAV's open timeout) stops the open of a file at the
    deadline: answered like any overrun."""
    path = tmp_path / "upload"
    path.write_bytes(single_keyframe)
    with pytest.raises(MediaError) as error:
        probe(path, DecodeBudget(deadline=time.monotonic() + 1e-4))
    assert error.value.code == "decode_budget_exceeded"


class _SetAfter(threading.Event):
    """An event that reads as set from its `calls`-th look on: a client leaving mid-decode."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def is_set(self) -> bool:
        self.calls -= 1
        return self.calls <= 0 or super().is_set()


def test_cancellation_stops_the_work(single_keyframe) -> None:
    assert not issubclass(DecodeCancelled, MediaError)  # answered as a disconnect, not a 400
    gone = threading.Event()
    gone.set()
    with pytest.raises(DecodeCancelled):
        probe(single_keyframe, DecodeBudget(cancelled=gone))
    info = probe(single_keyframe)
    with pytest.raises(DecodeCancelled):
        decode(
            single_keyframe, [59.0], (32, 48), info, budget=DecodeBudget(cancelled=_SetAfter(50))
        )


@pytest.mark.parametrize(
    ("data", "code"),
    [(b"\x00" * 1000, "invalid_video"), (audio_only_m4a(), "no_video_stream")],
)
def test_unreadable_inputs(data: bytes, code: str) -> None:
    with pytest.raises(MediaError) as info:
        probe(data)
    assert info.value.code == code
