"""stts-vllm: STTS video token pruning for vLLM (entry point `vllm.general_plugins`)."""

from stts_vllm.plugin import register

__all__ = ["register"]
