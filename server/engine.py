"""vLLM's async engine, in this process, with the STTS plugin; and what the routes need to
know about the served checkpoint (chat template, processor geometry, STTS defaults)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from server.frame_sampling import VisionGeometry
from server.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFacts:
    """Read from the checkpoint directory before the engine starts."""

    is_stts: bool
    default_keep_ratio: float
    geometry: VisionGeometry


def read_model_facts(settings: Settings) -> ModelFacts:
    from stts_vllm.plugin import STTS_ARCHITECTURE

    config = json.loads((settings.model / "config.json").read_text())
    processor = (
        json.loads((settings.model / "processor_config.json").read_text())
        if (settings.model / "processor_config.json").exists()
        else {}
    )
    video = processor.get("video_processor") or {}
    if not video and (settings.model / "preprocessor_config.json").exists():
        video = json.loads((settings.model / "preprocessor_config.json").read_text())
    size = video.get("size") or {}
    geometry = VisionGeometry(
        patch_size=int(video.get("patch_size", 14)),
        merge_size=int(video.get("merge_size", 2)),
        temporal_patch_size=int(video.get("temporal_patch_size", 2)),
        min_pixels=int(
            settings.frame_min_pixels or size.get("shortest_edge") or video.get("min_pixels", 3136)
        ),
        max_pixels=int(
            settings.frame_max_pixels or size.get("longest_edge") or video.get("max_pixels", 200704)
        ),
    )
    is_stts = STTS_ARCHITECTURE in config.get("architectures", [])
    keep = float((config.get("stts") or {}).get("keep_ratio", 1.0)) if is_stts else 1.0
    return ModelFacts(is_stts=is_stts, default_keep_ratio=keep, geometry=geometry)


def merge_engine_args(named: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`--engine-args` reaches every vLLM knob the server has no flag for (data parallel,
    quantization, KV-cache dtype, ...) without a second copy of vLLM's argument list; a typo or a
    knob that already has its own flag fails at start-up, not silently."""
    from dataclasses import fields

    from vllm import AsyncEngineArgs

    known = {f.name for f in fields(AsyncEngineArgs)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"--engine-args: not vLLM engine arguments: {unknown}")
    twice = sorted(set(extra) & set(named))
    if twice:
        flags = ", ".join("--" + k.replace("_", "-") for k in twice)
        raise ValueError(f"--engine-args: {twice} have their own flags; use {flags}")
    return {**named, **extra}


class EngineService:
    """Owns the `AsyncLLM`; started in the app lifespan, shut down with it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.facts = read_model_facts(settings)
        self.engine: Any = None
        self.ready = asyncio.Event()
        self._died = False

    def engine_args(self) -> Any:
        from vllm import AsyncEngineArgs

        s = self.settings
        named = dict(
            model=str(s.model),
            served_model_name=[s.served_model_name],
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            enforce_eager=s.enforce_eager,
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_num_seqs=s.max_num_seqs,
            limit_mm_per_prompt={
                "image": s.limit_images_per_prompt,
                "video": s.limit_videos_per_prompt,
            },
            disable_log_stats=False,
        )
        return AsyncEngineArgs(**merge_engine_args(named, s.engine_args))

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.engine_args()
        self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self.ready.set()
        logger.info("engine ready: %s (STTS: %s)", self.settings.model, self.facts.is_stts)

    @property
    def dead(self) -> bool:
        """vLLM's engine process died: it does not come back, only a new server process helps
        (sticky: still true after `stop`)."""
        if not self._died and self.engine is not None and self.engine.errored:
            self._died = True
        return self._died

    async def stop(self) -> None:
        self.ready.clear()
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
