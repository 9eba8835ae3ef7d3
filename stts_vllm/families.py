"""The model families STTS supports and every trait that differs between them.

A family names its stock and STTS architectures, where vLLM finds its STTS model class, how its
prompt lays out a video (timestamped or not, hence its default selection), how its processor
bounds a video's pixels, its vision towers in vLLM and in transformers with the STTS adapter
of each, and its demo geometry. Code elsewhere asks the family (`family.timestamped`), never
its name.

Kept free of vLLM and transformers imports: the plugin, the converter and the CLI all read it.
Classes are named as `"module:Class"` strings and imported only when used (`load_object`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from stts_vllm.core.config import STTSConfig, STTSConfigError

Framework = Literal["vllm", "transformers"]


@dataclass(frozen=True)
class Tower:
    """A framework's stock vision tower and the STTS adapter that runs it pruned
    (`stts_vllm.core.driver`), both as `"module:Class"`."""

    stock: str
    adapter: str


@dataclass(frozen=True)
class Family:
    name: str
    stock_architecture: str  # also the transformers model class
    stts_architecture: str
    model_path: str  # "module:Class" for vLLM's ModelRegistry
    # The prompt puts `<t seconds>` before each temporal step's tokens (Qwen3-VL): those
    # counts are fixed before the ViT runs, so each step keeps a quota (`per_step`).
    timestamped: bool
    # The video processor bounds a whole video's pixels (frames x area), not each frame's.
    bounds_video_volume: bool
    vllm_tower: Tower
    transformers_tower: Tower
    demo: str | None = None  # "module:NAME" of its `DemoGeometry`; None: no demo builder

    @property
    def selection(self) -> str:
        """The default `stts.selection`."""
        return "per_step" if self.timestamped else "global"

    @property
    def global_selection_ok(self) -> bool:
        """Can its prompt take a global top-k (no per-step counts)?"""
        return not self.timestamped

    def tower(self, framework: Framework) -> Tower:
        return self.vllm_tower if framework == "vllm" else self.transformers_tower


def load_object(path: str) -> Any:
    """The object a `"module:NAME"` string names, imported now."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"{path!r} is not of the form 'module:NAME'")
    return getattr(importlib.import_module(module), name)


_QWEN2_5_VL_VLLM = "vllm.model_executor.models.qwen2_5_vl"
_QWEN3_VL_VLLM_TOWER = Tower(
    stock="vllm.model_executor.models.qwen3_vl:Qwen3_VisionTransformer",
    adapter="stts_vllm.pruned_vision:Qwen3_VLTower",
)
_QWEN3_VL_HF_ADAPTER = "stts_vllm.training.hf_vision:HFQwen3_VLTower"

FAMILIES: tuple[Family, ...] = (
    Family(
        name="qwen2_5_vl",
        stock_architecture="Qwen2_5_VLForConditionalGeneration",
        stts_architecture="STTSQwen2_5_VLForConditionalGeneration",
        model_path="stts_vllm.qwen2_5_vl:STTSQwen2_5_VLForConditionalGeneration",
        timestamped=False,
        bounds_video_volume=False,
        vllm_tower=Tower(
            stock=f"{_QWEN2_5_VL_VLLM}:Qwen2_5_VisionTransformer",
            adapter="stts_vllm.pruned_vision:Qwen2_5_VLTower",
        ),
        transformers_tower=Tower(
            stock="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:"
            "Qwen2_5_VisionTransformerPretrainedModel",
            adapter="stts_vllm.training.hf_vision:HFQwen2_5_VLTower",
        ),
        demo="stts_vllm.demo:QWEN2_5_VL_DEMO",
    ),
    Family(
        name="qwen3_vl",
        stock_architecture="Qwen3VLForConditionalGeneration",
        stts_architecture="STTSQwen3VLForConditionalGeneration",
        model_path="stts_vllm.qwen3_vl:STTSQwen3VLForConditionalGeneration",
        timestamped=True,
        bounds_video_volume=True,
        vllm_tower=_QWEN3_VL_VLLM_TOWER,
        transformers_tower=Tower(
            stock="transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLVisionModel",
            adapter=_QWEN3_VL_HF_ADAPTER,
        ),
        demo="stts_vllm.demo:QWEN3_VL_DEMO",
    ),
    Family(
        name="qwen3_vl_moe",
        stock_architecture="Qwen3VLMoeForConditionalGeneration",
        stts_architecture="STTSQwen3VLMoeForConditionalGeneration",
        model_path="stts_vllm.qwen3_vl:STTSQwen3VLMoeForConditionalGeneration",
        timestamped=True,
        bounds_video_volume=True,
        vllm_tower=_QWEN3_VL_VLLM_TOWER,
        transformers_tower=Tower(
            stock="transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe:Qwen3VLMoeVisionModel",
            adapter=_QWEN3_VL_HF_ADAPTER,
        ),
    ),
    # Qwen3.5: the Qwen3-VL tower (no deepstack) and prompt, a hybrid LLM.
    Family(
        name="qwen3_5",
        stock_architecture="Qwen3_5ForConditionalGeneration",
        stts_architecture="STTSQwen3_5ForConditionalGeneration",
        model_path="stts_vllm.qwen3_vl:STTSQwen3_5ForConditionalGeneration",
        timestamped=True,
        bounds_video_volume=True,
        vllm_tower=_QWEN3_VL_VLLM_TOWER,
        transformers_tower=Tower(
            stock="transformers.models.qwen3_5.modeling_qwen3_5:Qwen3_5VisionModel",
            adapter=_QWEN3_VL_HF_ADAPTER,
        ),
        demo="stts_vllm.demo:QWEN3_5_DEMO",
    ),
)

FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
DEMO_FAMILIES: tuple[str, ...] = tuple(f.name for f in FAMILIES if f.demo is not None)


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


def tower_adapter_class(visual: object, framework: Framework) -> Any:
    """The STTS adapter class for a live vision tower of `framework`: the family whose stock
    tower `visual` is (or subclasses), matched by class path so that no other family's
    modules are imported."""
    for cls in type(visual).__mro__:
        path = f"{cls.__module__}:{cls.__qualname__}"
        for family in FAMILIES:
            tower = family.tower(framework)
            if tower.stock == path:
                return load_object(tower.adapter)
    raise TypeError(f"no STTS adapter for vision tower {type(visual).__name__}")


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
