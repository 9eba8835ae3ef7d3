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
    n = int(frames.shape[0])
    return frames, {
        "fps": fps,
        "duration": n / fps,
        "total_num_frames": n,
        "frames_indices": list(range(n)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }


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


def encode_mp4(frames: np.ndarray, fps: int = 4) -> bytes:
    """Frames -> an H.264 (or MPEG-4 part 2, if x264 is missing) mp4, in memory, with PyAV."""
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
