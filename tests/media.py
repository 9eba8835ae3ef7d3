"""Synthetic media for tests: deterministic frames with a static background and a moving
square, so temporal scores have something real to find."""

from __future__ import annotations

from typing import Any

import numpy as np


def moving_square_video(
    num_frames: int, height: int, width: int, *, seed: int = 0, square: int = 24
) -> np.ndarray:
    """`[T, H, W, 3]` uint8: a fixed random texture with a bright square drifting across."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    frames = np.repeat(background[None], num_frames, axis=0)
    for i in range(num_frames):
        y = (7 * i + seed) % max(1, height - square)
        x = (11 * i + 3 * seed) % max(1, width - square)
        frames[i, y : y + square, x : x + square] = (255, 64 * (i % 4), 0)
    return frames


def video_item(frames: np.ndarray, fps: float = 2.0) -> tuple[np.ndarray, dict[str, Any]]:
    """vLLM's offline video input: frames plus the metadata its Qwen2.5-VL processor wants."""
    from stts_vllm.video_inputs import video_metadata

    return frames, video_metadata(int(frames.shape[0]), fps)


def image(height: int, width: int, seed: int = 0) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8))


def chat_prompt(*parts: str, question: str = "What happens in the video?") -> str:
    """A Qwen chat prompt with one placeholder per media part ("video" or "image")."""
    tags = {
        "video": "<|vision_start|><|video_pad|><|vision_end|>",
        "image": "<|vision_start|><|image_pad|><|vision_end|>",
    }
    media = "".join(tags[p] for p in parts)
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{media}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def encode_video(
    frames: np.ndarray,
    fps: int = 4,
    *,
    container: str = "mp4",
    codec: str = "libx264",
    rotation: int | None = None,
    times: list[float] | None = None,
    pix_fmt: str | None = None,
) -> bytes:
    """Frames -> an encoded video in memory (PyAV). `times` gives each frame's timestamp in
    seconds (variable frame rate); `rotation` sets the display matrix (degrees CCW)."""
    import fractions
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = pix_fmt or ("rgb8" if codec == "gif" else "yuv420p")
        if times is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        out.start_encoding()  # writes the header even for a video with no frames
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if times is not None:
                video_frame.pts = round(times[i] * 1000)
                video_frame.time_base = fractions.Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def encode_keyframed_video(
    frames: np.ndarray, fps: int = 10, *, keyframe_every: int | None = None
) -> bytes:
    """Frames -> an H.264 mp4 with a keyframe exactly every `keyframe_every` frames, or only
    the first one (None; no scene-cut keyframes either): there every seek lands back at the
    start, the worst case for seeking."""
    import io

    import av

    keyint = keyframe_every or 1_000_000
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream(
            "libx264",
            rate=fps,
            options={"x264-params": f"scenecut=0:keyint={keyint}:min-keyint={keyint}"},
        )
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.gop_size = keyint
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def encode_mp4(frames: np.ndarray, fps: int = 4) -> bytes:
    """Frames -> an H.264 mp4, in memory."""
    return encode_video(frames, fps)


def level_video(num_frames: int, height: int = 64, width: int = 96) -> np.ndarray:
    """Frame i is a flat gray of level 4 * i (+ a dark corner marking the top-left), so a
    decoded frame tells which source frame it was, and its orientation."""
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        frames[i] = min(255, 16 + 4 * i)
    frames[:, : height // 4, : width // 4] = 0
    return frames


def audio_only_m4a(seconds: float = 1.0) -> bytes:
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = int(16000 * seconds)
        tone = (np.sin(np.arange(samples) / 8.0) * 0.2).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()
