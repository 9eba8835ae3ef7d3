"""vLLM's async engine, in this process, with the STTS plugin; and what the routes need to
know about the served checkpoint (chat template, processor geometry, STTS defaults)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from server.settings import Settings
from stts_vllm.media.geometry import VisionGeometry, read_vision_geometry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFacts:
    """Read from the checkpoint directory before the engine starts."""

    is_stts: bool
    default_keep_ratio: float
    geometry: VisionGeometry


def read_model_facts(settings: Settings) -> ModelFacts:
    """The family (from `config.json`), STTS defaults, and the video processor's geometry
    (`stts_vllm.media.geometry`): a checkpoint that lacks one stops the server at start-up
    with the missing field named."""
    from stts_vllm.families import FAMILIES

    config = json.loads((settings.model / "config.json").read_text())
    geometry = read_vision_geometry(
        settings.model, min_pixels=settings.frame_min_pixels, max_pixels=settings.frame_max_pixels
    )
    is_stts = any(f.stts_architecture in config.get("architectures", []) for f in FAMILIES)
    return ModelFacts(
        is_stts=is_stts,
        default_keep_ratio=_default_keep_ratio(settings, config, is_stts),
        geometry=geometry,
    )


def _default_keep_ratio(settings: Settings, config: dict[str, Any], is_stts: bool) -> float:
    """`--keep-ratio` where given (an evaluation sweeps ratios on one checkpoint), else the
    checkpoint's own; a stock checkpoint prunes nothing, so it refuses anything below 1."""
    if settings.keep_ratio is not None:
        if not is_stts and settings.keep_ratio < 1.0:
            raise ValueError(
                f"--keep-ratio {settings.keep_ratio}: {settings.model} is a stock checkpoint "
                f"(architectures {config.get('architectures')}), which cannot prune; make an "
                "STTS one with `stts-vllm convert`, or leave --keep-ratio unset"
            )
        return settings.keep_ratio
    return float((config.get("stts") or {}).get("keep_ratio", 1.0)) if is_stts else 1.0


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

        from stts_vllm.encoder_budget import PATCH_BUDGET_ENV, TIMING_ENV

        # Read by the model in vLLM's engine process, which inherits this environment.
        if self.settings.encoder_patch_budget is not None:
            os.environ[PATCH_BUDGET_ENV] = str(self.settings.encoder_patch_budget)
        if self.settings.encoder_timing:
            os.environ[TIMING_ENV] = "1"
        args = self.engine_args()
        self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self.ready.set()
        logger.info("engine ready: %s (STTS: %s)", self.settings.model, self.facts.is_stts)

    async def encoder_calls(self, timeout: float = 2.0) -> dict[str, float] | None:
        """The pruned tower's counters from the engine's worker (the first rank: tensor
        parallel ranks encode the same videos); None when the engine is not serving or does
        not answer within `timeout` (it answers between steps)."""
        if self.engine is None or not self.ready.is_set() or self.dead:
            return None
        try:
            results = await asyncio.wait_for(
                self.engine.collective_rpc("stts_encoder_calls"), timeout
            )
        except Exception:  # a scrape must never fail because of the engine
            logger.debug("encoder counters unavailable", exc_info=True)
            return None
        return results[0] if results else None

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
