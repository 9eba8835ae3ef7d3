"""The family table: every trait a model family has lives on its `Family`, and each is sound."""

from __future__ import annotations

import pytest

from stts_vllm.core.config import STTSConfig, STTSConfigError
from stts_vllm.families import (
    DEMO_FAMILIES,
    FAMILIES,
    FAMILY_NAMES,
    Family,
    family_named,
    family_of_architecture,
    family_of_config,
    load_object,
    resolve_stts,
    tower_adapter_class,
)

by_name = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)


def test_names_and_architectures_are_unique() -> None:
    archs = [a for f in FAMILIES for a in (f.stock_architecture, f.stts_architecture)]
    assert len(set(FAMILY_NAMES)) == len(FAMILIES)
    assert len(set(archs)) == len(archs)


@by_name
def test_architectures_resolve_both_ways(family: Family) -> None:
    for arch in (family.stock_architecture, family.stts_architecture):
        assert family_of_architecture(arch) is family
        assert family_of_config({"architectures": [arch]}) is family
    assert family_named(family.name) is family


def test_unknown_architecture_is_refused_naming_what_is_supported() -> None:
    assert family_of_architecture("LlavaForConditionalGeneration") is None
    with pytest.raises(ValueError, match="not supported by STTS") as err:
        family_of_config({"architectures": ["LlavaForConditionalGeneration"]}, "x/config.json")
    message = str(err.value)
    assert message.startswith("x/config.json")
    for family in FAMILIES:
        assert family.stock_architecture in message
    with pytest.raises(ValueError, match="not supported"):
        family_of_config({})


def test_unknown_family_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model family 'llava'") as err:
        family_named("llava")
    assert all(name in str(err.value) for name in FAMILY_NAMES)


@by_name
def test_timestamped_families_take_per_step_and_refuse_global(family: Family) -> None:
    default = resolve_stts(STTSConfig(), family)
    per_step = resolve_stts(STTSConfig(selection="per_step"), family)
    assert per_step.selection == "per_step"  # every family can keep a quota per step
    if family.timestamped:
        assert family.selection == default.selection == "per_step"
        assert not family.global_selection_ok
        with pytest.raises(STTSConfigError, match=r"stts\.selection 'global' does not fit"):
            resolve_stts(STTSConfig(selection="global"), family)
    else:
        assert family.selection == default.selection == "global"
        assert family.global_selection_ok
        assert resolve_stts(STTSConfig(selection="global"), family).selection == "global"


def test_qwen3_vl_family_is_timestamped_and_qwen2_5_vl_is_not() -> None:
    assert not family_named("qwen2_5_vl").timestamped
    assert not family_named("qwen2_5_vl").bounds_video_volume
    for name in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5"):
        assert family_named(name).timestamped
        assert family_named(name).bounds_video_volume


@by_name
@pytest.mark.parametrize("framework", ["vllm", "transformers"])
def test_tower_paths_import(family: Family, framework: str) -> None:
    tower = family.tower(framework)  # type: ignore[arg-type]
    stock, adapter = load_object(tower.stock), load_object(tower.adapter)
    assert isinstance(stock, type) and isinstance(adapter, type)
    for method in ("embed", "layout", "run_block", "run_biased_block", "merge_units"):
        assert callable(getattr(adapter, method)), (adapter, method)


@by_name
@pytest.mark.parametrize("framework", ["vllm", "transformers"])
def test_a_live_tower_finds_its_family_adapter(family: Family, framework: str) -> None:
    """Matched by class path along the MRO: a subclass of a stock tower takes its adapter."""
    tower = family.tower(framework)  # type: ignore[arg-type]
    subclass = type("CustomTower", (load_object(tower.stock),), {})
    assert tower_adapter_class(object.__new__(subclass), framework) is load_object(tower.adapter)  # type: ignore[arg-type]


def test_an_unknown_tower_is_refused() -> None:
    with pytest.raises(TypeError, match="no STTS adapter for vision tower object"):
        tower_adapter_class(object(), "vllm")


@by_name
def test_stock_architecture_is_a_transformers_class(family: Family) -> None:
    import transformers

    assert isinstance(getattr(transformers, family.stock_architecture), type)


@by_name
def test_model_path_names_the_family_stts_class(family: Family) -> None:
    """vLLM registers `stts_architecture` from `model_path`: the STTS subclass of vLLM's
    stock class, which carries this family."""
    model = load_object(family.model_path)
    assert model.__name__ == family.stts_architecture
    assert model.stts_family is family
    assert any(
        base.__name__ == family.stock_architecture
        and base.__module__.startswith("vllm.model_executor.models.")
        for base in model.__mro__
    )


def test_load_object_refuses_a_path_without_a_name() -> None:
    with pytest.raises(ValueError, match="module:NAME"):
        load_object("stts_vllm.families")


@by_name
def test_demo_families_name_a_demo_geometry(family: Family) -> None:
    from stts_vllm.demo import DemoGeometry, demo_geometry

    if family.demo is None:
        assert family.name not in DEMO_FAMILIES
        with pytest.raises(ValueError, match="make_demo builds families"):
            demo_geometry(family)
        return
    import transformers

    geometry = demo_geometry(family)
    assert family.name in DEMO_FAMILIES
    assert isinstance(geometry, DemoGeometry)
    assert isinstance(getattr(transformers, geometry.config_class), type)
    # a timestamped family's demo has the Qwen3-VL tower's layout (deepstack, no windows)
    assert (geometry.layout == "deepstack") == family.timestamped
    assert geometry.unit_pixels == (32 if family.timestamped else 28)
