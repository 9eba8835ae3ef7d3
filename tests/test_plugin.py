"""Plugin registration: runs in every vLLM process, so it must be idempotent."""

import pytest
from vllm import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from stts_vllm import register
from stts_vllm.plugin import STTS_ARCHITECTURE, STTSModelConfigHook


def test_register_is_idempotent() -> None:
    register()
    patched = CPUModelRunner.load_model
    register()
    assert CPUModelRunner.load_model is patched
    assert patched._stts_sets_pruning_flag
    assert not getattr(patched.__wrapped__, "_stts_sets_pruning_flag", False)  # wrapped once
    assert STTS_ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert MODELS_CONFIG_MAP[STTS_ARCHITECTURE] is STTSModelConfigHook
    encode = GPUModelRunner._execute_mm_encoder  # the CPU runner inherits it
    register()
    assert (
        GPUModelRunner._execute_mm_encoder is encode
        and CPUModelRunner._execute_mm_encoder is encode
    )
    assert not getattr(encode.__wrapped__, "_stts_batches_videos", False)  # wrapped once


def test_plugin_is_discoverable_by_vllm() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "stts"]
    assert entry.load() is register


def test_the_patch_budget_setting_is_checked(monkeypatch) -> None:
    """`STTS_ENCODER_PATCH_BUDGET` (set by `stts-serve --encoder-patch-budget`) overrides the
    profiled budget; anything but a positive integer stops the engine with its name."""
    from stts_vllm import encoder_budget

    monkeypatch.setattr(encoder_budget, "profiled_patch_budget", lambda config, merge: 4096)
    monkeypatch.delenv(encoder_budget.PATCH_BUDGET_ENV, raising=False)
    assert encoder_budget.encoder_patch_budget(None, 2) == 4096
    monkeypatch.setenv(encoder_budget.PATCH_BUDGET_ENV, "1")
    assert encoder_budget.encoder_patch_budget(None, 2) == 1
    for bad in ("0", "-3", "lots"):
        monkeypatch.setenv(encoder_budget.PATCH_BUDGET_ENV, bad)
        with pytest.raises(ValueError, match="STTS_ENCODER_PATCH_BUDGET"):
            encoder_budget.encoder_patch_budget(None, 2)
