"""From decoded media to the tensors and ids training feeds the model, through the checkpoint's
own processor: a video's pixels and grid, Qwen2.5-VL's time factor, Qwen3-VL's step timestamps;
an image's pixels. Needs no weights, so a DataLoader worker builds one from the checkpoint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from stts_vllm.core import mrope_time_factor
from stts_vllm.families import Family, family_of_config
from stts_vllm.video_inputs import timed_video_metadata


@dataclass
class MediaInput:
    """One image or video of a sample, preprocessed: its pixels and grid as the processor
    gives them, its time factor (Qwen2.5-VL's M-RoPE) and, for a Qwen3-VL video, the
    `<t seconds>` ids of every temporal step."""

    kind: Literal["video", "image"]
    pixel_values: torch.Tensor
    grid: tuple[int, int, int]  # (T, H, W) in patches
    t_factor: float = 1.0
    step_texts: list[list[int]] | None = None


class InputBuilder:
    """The checkpoint's processor, and what placing its media needs."""

    def __init__(self, processor: Any, family: Family, vision_config: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.temporal_patch_size = int(_get(vision_config, "temporal_patch_size"))
        self.tokens_per_second = float(_get(vision_config, "tokens_per_second", 1.0))

    @classmethod
    def from_checkpoint(cls, path: Path) -> InputBuilder:
        from transformers import AutoProcessor

        config = json.loads((Path(path) / "config.json").read_text())
        family = family_of_config(config, str(Path(path) / "config.json"))
        return cls(AutoProcessor.from_pretrained(path), family, config["vision_config"])

    def video(self, frames: Any, fps: float, times: Sequence[float] | None = None) -> MediaInput:
        """Frames (`[T, H, W, 3]`, already sampled and sized) through the checkpoint's video
        processor, with what positions and prompt need: Qwen2.5-VL's time factor at `fps`,
        and Qwen3-VL's per-step `<t seconds>`, each step at its frames' mean time as vLLM's
        processor prints it (`times`: the frames' decode times; default: spaced at `fps`)."""
        video = self.processor.video_processor(
            videos=[frames], do_sample_frames=False, return_tensors="pt"
        )
        grid = tuple(int(x) for x in video["video_grid_thw"][0])
        step_texts = None
        if self.family.timestamped:
            if times is None:
                indices, rate = list(range(len(frames))), fps
            else:  # in milliseconds, as the server's metadata gives them (`video_inputs`)
                metadata = timed_video_metadata(times, times[-1])
                indices, rate = metadata["frames_indices"], metadata["fps"]
            step_times = self.processor._calculate_timestamps(
                indices, rate, self.temporal_patch_size
            )
            step_texts = [
                self.tokenizer.encode(f"<{t:.1f} seconds>", add_special_tokens=False)
                for t in step_times
            ]
        return MediaInput(
            kind="video",
            pixel_values=video["pixel_values_videos"],
            grid=grid,  # type: ignore[arg-type]
            # as serving computes it (the processor's float32 seconds per step)
            t_factor=mrope_time_factor(self.temporal_patch_size / fps, self.tokens_per_second),
            step_texts=step_texts,
        )

    def image(self, image: Any) -> MediaInput:
        """An image through the checkpoint's image processor: one temporal step, never
        pruned."""
        processed = self.processor.image_processor(images=[image], return_tensors="pt")
        grid = tuple(int(x) for x in processed["image_grid_thw"][0])
        return MediaInput(kind="image", pixel_values=processed["pixel_values"], grid=grid)  # type: ignore[arg-type]


def _get(config: Any, name: str, default: Any = None) -> Any:
    """A field of a config object or of its dict."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)
