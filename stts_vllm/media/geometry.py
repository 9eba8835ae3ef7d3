"""The served model's vision geometry, read from its processor config: what its processor does
to frames, so frames decoded at `frame_size` pass it unchanged."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class VisionGeometry:
    """What the served model's processor does to frames (read from its processor config).

    Qwen2.5-VL bounds each frame's area by `min_pixels..max_pixels`; Qwen3-VL bounds a whole
    video's volume (frames x height x width) and writes each temporal step's time into the
    prompt (`per_video_pixels`, `timestamped`)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 200704
    per_video_pixels: bool = False
    timestamped: bool = False

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def read_vision_geometry(
    model: Path, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> VisionGeometry:
    """Read, never assumed (Qwen2.5-VL has 14 px patches, Qwen3-VL 16): a checkpoint that
    lacks a field is an error naming it. `min_pixels` / `max_pixels` override the processor's
    pixel bounds."""
    from stts_vllm.families import family_of_config

    config = json.loads((model / "config.json").read_text())
    family = family_of_config(config, str(model / "config.json"))
    video, source = _video_processor_config(model)

    def field(name: str) -> int:
        if not isinstance(video.get(name), int):
            raise ValueError(f"{source}: the video processor config has no integer {name!r}")
        return int(video[name])

    size = video.get("size") or {}
    bounds = {}
    for bound, (size_key, legacy_key) in {
        "min_pixels": ("shortest_edge", "min_pixels"),
        "max_pixels": ("longest_edge", "max_pixels"),
    }.items():
        value = size.get(size_key, video.get(legacy_key))
        if not isinstance(value, int):
            raise ValueError(
                f"{source}: the video processor config has no size.{size_key} ({legacy_key})"
            )
        bounds[bound] = value
    return VisionGeometry(
        patch_size=field("patch_size"),
        merge_size=field("merge_size"),
        temporal_patch_size=field("temporal_patch_size"),
        min_pixels=int(min_pixels or bounds["min_pixels"]),
        max_pixels=int(max_pixels or bounds["max_pixels"]),
        per_video_pixels=family.bounds_video_volume,
        timestamped=family.timestamped,
    )


def _video_processor_config(model: Path) -> tuple[dict[str, Any], str]:
    """transformers v5 keeps it in `processor_config.json`, older checkpoints in
    `video_preprocessor_config.json` or `preprocessor_config.json`."""
    combined = model / "processor_config.json"
    if combined.exists():
        video = json.loads(combined.read_text()).get("video_processor")
        if video:
            return video, str(combined)
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = model / name
        if path.exists():
            return json.loads(path.read_text()), str(path)
    raise ValueError(
        f"{model} has no video processor config (processor_config.json, "
        "video_preprocessor_config.json or preprocessor_config.json)"
    )
