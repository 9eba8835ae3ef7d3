"""PyAV decoding and frame planning, on videos generated here (no server needed)."""

from __future__ import annotations

import io
from pathlib import Path

import av
import pytest
from media import audio_only_m4a, encode_video, level_video

from server.frame_sampling import VisionGeometry, frame_size, plan_frames, video_tokens
from server.media_errors import MediaError
from server.video_decode import decode, probe

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
    """A long video sampled sparsely: targets far apart are reached by seeking."""
    data = encode_video(level_video(60 * 2, 32, 48), 2)  # 60 s at 2 fps, keyframes every ~12 s
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


@pytest.mark.parametrize(
    ("data", "code"),
    [(b"\x00" * 1000, "invalid_video"), (audio_only_m4a(), "no_video_stream")],
)
def test_unreadable_inputs(data: bytes, code: str) -> None:
    with pytest.raises(MediaError) as info:
        probe(data)
    assert info.value.code == code


def test_plan_frames() -> None:
    common = {"fps": 2.0, "num_frames": None, "min_frames": 4, "max_frames": 64}
    plan = plan_frames(10.0, 40, (56, 56), keep_ratio=1.0, test_time_scaling=True, **common)
    assert plan.num_frames == 20 and not plan.test_time_scaled
    scaled = plan_frames(10.0, 400, (56, 56), keep_ratio=0.5, test_time_scaling=True, **common)
    assert scaled.num_frames == 40 and scaled.test_time_scaled
    capped = plan_frames(100.0, 4000, (56, 56), keep_ratio=0.3, test_time_scaling=True, **common)
    assert capped.num_frames == 64
    short = plan_frames(1.0, 3, (56, 56), keep_ratio=1.0, test_time_scaling=False, **common)
    assert short.num_frames == 3  # never more than the video has
    assert plan.times == sorted(plan.times) and 0 < plan.times[0] < plan.times[-1] < 10


def test_video_tokens_match_the_count_function() -> None:
    grid, before, after = video_tokens(20, (224, 224), VisionGeometry(), 0.5)
    assert grid == (10, 8, 8) and before == 640 and after == 320
    grid, before, after = video_tokens(7, (56, 84), VisionGeometry(), 1.0)
    assert grid == (4, 2, 3) and before == after == 24
