"""The model families STTS supports: their stock and STTS architecture names, where vLLM
finds each STTS model class, and the selection its prompt format needs.

Kept free of vLLM and transformers imports: the plugin, the converter and the CLI all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from stts_vllm.core.config import STTSConfig, STTSConfigError


@dataclass(frozen=True)
class Family:
    name: str
    stock_architecture: str
    stts_architecture: str
    model_path: str  # "module:Class" for vLLM's ModelRegistry
    selection: str  # the default `stts.selection`
    global_selection_ok: bool  # can its prompt take a global top-k (no per-step counts)?


FAMILIES: tuple[Family, ...] = (
    Family(
        name="qwen2_5_vl",
        stock_architecture="Qwen2_5_VLForConditionalGeneration",
        stts_architecture="STTSQwen2_5_VLForConditionalGeneration",
        model_path="stts_vllm.qwen2_5_vl:STTSQwen2_5_VLForConditionalGeneration",
        selection="global",
        global_selection_ok=True,
    ),
    # Qwen3-VL's prompt puts `<t seconds>` before each temporal step's tokens, and those
    # counts are fixed before the ViT runs: each step keeps a quota (`per_step`).
    Family(
        name="qwen3_vl",
        stock_architecture="Qwen3VLForConditionalGeneration",
        stts_architecture="STTSQwen3VLForConditionalGeneration",
        model_path="stts_vllm.qwen3_vl:STTSQwen3VLForConditionalGeneration",
        selection="per_step",
        global_selection_ok=False,
    ),
    Family(
        name="qwen3_vl_moe",
        stock_architecture="Qwen3VLMoeForConditionalGeneration",
        stts_architecture="STTSQwen3VLMoeForConditionalGeneration",
        model_path="stts_vllm.qwen3_vl:STTSQwen3VLMoeForConditionalGeneration",
        selection="per_step",
        global_selection_ok=False,
    ),
    Family(
        name="qwen3_5",
        stock_architecture="Qwen3_5ForConditionalGeneration",
        stts_architecture="STTSQwen3_5ForConditionalGeneration",
        model_path="stts_vllm.qwen3_vl:STTSQwen3_5ForConditionalGeneration",
        selection="per_step",
        global_selection_ok=False,
    ),
)

FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)


def family_of_architecture(arch: str) -> Family | None:
    """The family whose stock or STTS architecture is `arch`."""
    for family in FAMILIES:
        if arch in (family.stock_architecture, family.stts_architecture):
            return family
    return None


def family_of_config(config: dict, source: str = "config.json") -> Family:
    """The family of a checkpoint's raw `config.json`; anything else is refused with a
    message naming what is supported."""
    archs = config.get("architectures") or []
    for arch in archs:
        family = family_of_architecture(arch)
        if family is not None:
            return family
    supported = [f.stock_architecture for f in FAMILIES]
    raise ValueError(
        f"{source}: architectures {archs} is not supported by STTS; supported stock "
        f"architectures: {supported} (or their STTS versions)"
    )


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {list(FAMILY_NAMES)}")


def resolve_stts(config: STTSConfig, family: Family) -> STTSConfig:
    """`config` with the family's selection filled in; a selection the family's prompt cannot
    take is refused (the message names the field)."""
    if config.selection is None:
        return STTSConfig.from_dict({**config.to_dict(), "selection": family.selection})
    if config.selection == "global" and not family.global_selection_ok:
        raise STTSConfigError(
            f"stts.selection 'global' does not fit {family.stock_architecture}: its prompt puts "
            "a timestamp before each temporal step, so every step's token count must be fixed "
            "before the ViT runs; use 'per_step' (the default)"
        )
    return config
