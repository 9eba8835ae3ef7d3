"""Plugin registration: runs in every vLLM process, so it must be idempotent."""

from vllm import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

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


def test_plugin_is_discoverable_by_vllm() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "stts"]
    assert entry.load() is register
