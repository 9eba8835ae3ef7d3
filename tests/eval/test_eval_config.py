"""`EvalConfig`: what `stts-vllm eval` hands the evaluator, its defaults and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from stts_vllm.eval.config import METHODS, EvalConfig


def test_the_eval_command_without_flags_runs_the_configs_defaults(monkeypatch) -> None:
    """The CLI takes its defaults from `EvalConfig`, so the two cannot drift apart."""
    from stts_vllm import cli
    from stts_vllm.eval import run

    seen = {}
    monkeypatch.setattr(run, "run_eval", lambda config: seen.setdefault("config", config))
    cli.main(["eval", "ckpt"])
    assert seen["config"] == EvalConfig(checkpoint=Path("ckpt"))
    assert seen["config"].methods == METHODS and seen["config"].selections is None


def test_flags_reach_the_config_as_tuples(monkeypatch) -> None:
    from stts_vllm import cli
    from stts_vllm.eval import run

    seen = {}
    monkeypatch.setattr(run, "run_eval", lambda config: seen.setdefault("config", config))
    cli.main(
        ["eval", "ckpt", "--ratios", "[0.5]", "--methods", "[none,learned]", "--selections", "[]"]
    )
    config = seen["config"]
    assert config.ratios == (0.5,) and config.methods == ("none", "learned")
    assert config.selections == ()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("methods", ["none", "learnd"], "methods"),
        ("selections", ["per-step"], "selections"),
        ("ratios", [0.5, 0.0], "ratios"),
        ("ratios", [1.5], "ratios"),
        ("samples", 0, "samples"),
        ("compare_hf", -1, "compare_hf"),
    ],
)
def test_bad_values_are_refused_and_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EvalConfig(checkpoint=Path("ckpt"), **{field: value})


def test_the_eval_command_refuses_a_bad_method_before_an_engine_starts(monkeypatch) -> None:
    from pydantic import ValidationError

    from stts_vllm import cli
    from stts_vllm.eval import run

    monkeypatch.setattr(run, "run_eval", lambda config: pytest.fail("the eval ran"))
    with pytest.raises((ValidationError, SystemExit), match="methods"):
        cli.main(["eval", "ckpt", "--methods", "[lerned]"])


def test_the_config_is_frozen() -> None:
    from dataclasses import FrozenInstanceError

    config = EvalConfig(checkpoint=Path("ckpt"))
    with pytest.raises(FrozenInstanceError):
        config.samples = 3  # type: ignore[misc]
