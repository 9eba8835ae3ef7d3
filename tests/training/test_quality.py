"""The quality study (`experiments/quality.py`): aggregation of eval rows over training seeds,
the quality targets, and the command lines of the study and of `stts-vllm train`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from experiments import quality
from experiments.quality import QualityConfig, aggregate, empty_steps, targets
from stts_vllm.checkpoint import SCORER_FILE, scorer_state_dict_to_file
from stts_vllm.demo import make_demo


def _report(acc: dict[str, float], samples: int = 100) -> dict:
    rows = []
    for mode, accuracy in acc.items():
        split, label, _ = mode.split("/", 2)
        method = label.split("@")[0]
        keep = float(label.split("@")[1].split("/")[0]) if "@" in label else 1.0
        rows.append(
            {
                "mode": mode,
                "method": method,
                "keep": keep,
                "split": split,
                "accuracy": accuracy,
                "samples": samples,
                "video_tokens_mean": 144.0,
            }
        )
    return {"results": rows}


ROWS = {
    "test/none/16f": 0.80,
    "test/learned@0.5/16f": 0.795,
    "test/random@0.3/16f": 0.70,
    "test/learned@0.3/16f": 0.75,
    "test/random@0.2/16f": 0.65,
    "test/learned@0.2/16f": 0.67,
    "distractor/learned@0.5/16f": 0.90,
    "distractor/heuristic@0.5/16f": 0.40,
    "distractor/random@0.5/16f": 0.86,
    "long/none/16f": 0.6,
    "long/learned@0.5/32f": 0.9,
}


def test_rows_are_pooled_over_seeds_and_targets_read_the_means() -> None:
    second = dict(ROWS) | {"distractor/random@0.5/16f": 0.84, "test/learned@0.2/16f": 0.67}
    rows = aggregate([_report(ROWS), _report(second)])
    row = rows["distractor/random@0.5/16f"]
    assert row.accuracies == [0.86, 0.84] and row.mean == pytest.approx(0.85)
    assert (row.correct, row.total) == (170, 200)
    summary = row.summary()
    assert summary["spread"] == [0.84, 0.86]
    assert summary["pooled_ci95"][0] < 0.85 < summary["pooled_ci95"][1]

    checks = {t["target"]: t for t in targets(rows)}
    assert checks["distractor: learned - heuristic @0.5"]["met"] is True
    edge = checks["distractor: learned - random @0.5"]  # 0.90 - 0.85: exactly 5 points
    assert edge["measured"] == pytest.approx(0.05) and edge["met"] is True
    assert edge["per_seed"] == pytest.approx([0.04, 0.06])  # 0.90 - 0.86, 0.90 - 0.84
    assert checks["test: learned@0.5 - keep 1.0 (>= -1 point)"]["met"] is True
    assert checks["test: learned - random @0.3"]["met"] is True
    low = checks["test: learned - random @0.2"]  # 0.67 - 0.65: 2 points
    assert low["measured"] == pytest.approx(0.02) and low["met"] is False
    # rows that were not run are "n/a", not a pass
    assert checks["long: heuristic@0.5 32f - keep 1.0 16f (equal tokens)"]["met"] is None


def test_a_goal_above_what_keep_1_0_leaves_is_reported_as_not_reachable() -> None:
    """Heuristic at 0.90 where keep 1.0 answers 0.92: even a lossless scorer gains 2 points."""
    rows = aggregate(
        [
            _report(
                ROWS
                | {
                    "distractor/none/16f": 0.92,
                    "distractor/heuristic@0.5/16f": 0.90,
                    "test/random@0.3/16f": 0.70,
                }
            )
        ]
    )
    checks = {t["target"]: t for t in targets(rows)}
    tight = checks["distractor: learned - heuristic @0.5"]
    assert tight["headroom"] == pytest.approx(0.02) and tight["reachable"] is False
    assert tight["met"] is False  # 0.90 - 0.90
    roomy = checks["test: learned - random @0.3"]  # keep 1.0 0.80 - random 0.70
    assert roomy["headroom"] == pytest.approx(0.10) and roomy["reachable"] is True
    # gaps to keep 1.0 itself, and rows without a keep-1.0 row on their split, have none
    assert checks["test: learned@0.5 - keep 1.0 (>= -1 point)"]["headroom"] is None
    plain = {t["target"]: t for t in targets(aggregate([_report(ROWS)]))}
    assert plain["distractor: learned - random @0.5"]["reachable"] is None


def test_in_scorer_mode_each_seeds_gap_is_to_the_shared_base_rows() -> None:
    """Scorer mode evaluates the base rows once and the learned rows per seed."""
    base = _report({k: v for k, v in ROWS.items() if "learned" not in k})
    learned = {k: v for k, v in ROWS.items() if "learned" in k}
    rows = aggregate([base, _report(learned), _report(learned | {"test/learned@0.2/16f": 0.71})])
    assert rows["test/random@0.2/16f"].accuracies == [0.65]
    low = {t["target"]: t for t in targets(rows)}["test: learned - random @0.2"]
    assert low["measured"] == pytest.approx(0.04)  # mean(0.67, 0.71) - 0.65
    assert low["per_seed"] == pytest.approx([0.02, 0.06])


def test_the_quality_command_hands_every_training_knob_to_each_seed(monkeypatch) -> None:
    """The scorer recipe (`--mode scorer --init BASE --keep-ratios ... --aux-weight 0`) must
    reach `train` whole; a dropped flag would silently train the default recipe."""
    seen = {}
    monkeypatch.setattr(quality, "run_quality", lambda args: seen.setdefault("args", args))
    quality.main(
        [
            "out",
            "--init",
            "base",
            "--mode",
            "scorer",
            "--seeds",
            "[3,4]",
            "--steps",
            "300",
            "--warmup",
            "30",
            "--keep-ratios",
            "[0.5,0.3]",
            "--scorer-lr",
            "0.005",
            "--aux-weight",
            "0",
            "--tasks",
            "[count,count,color]",
            "--explore",
            "0.5",
            "--policy-weight",
            "1.5",
            "--answer-loss-on",
            "top_k",
            "--frames",
            "[8,16]",
        ]
    )
    args = seen["args"]
    assert args.mode == "scorer" and str(args.init) == "base" and args.seeds == [3, 4]
    assert args.train_fields == {
        "steps": 300,
        "batch_size": 16,
        "lr": 1e-3,
        "scorer_lr": 0.005,
        "aux_weight": 0.0,
        "warmup": 30,
        "keep_ratios": [0.5, 0.3],
        "frames": [8, 16],
        "device": "cpu",
        "dtype": "float32",
        "explore": 0.5,
        "policy_weight": 1.5,
        "answer_loss_on": "top_k",
        "tasks": ["count", "count", "color"],
    }


def test_the_train_command_without_flags_trains_the_training_configs_defaults(
    monkeypatch, capsys
) -> None:
    """The CLI takes its defaults from `TrainConfig`, so the two cannot drift apart."""
    from stts_vllm import cli
    from stts_vllm.training import train
    from stts_vllm.training.config import TrainConfig

    seen = {}
    monkeypatch.setattr(train, "train", lambda config: seen.setdefault("config", config))
    cli.main(["train", "out", "--init", "base"])
    assert seen["config"] == TrainConfig(init=Path("base"), out=Path("out"))
    assert "trained STTS checkpoint" in capsys.readouterr().out


def test_the_training_mix_reaches_the_config_and_unknown_tasks_are_refused(
    monkeypatch, tmp_path: Path
) -> None:
    from pydantic import ValidationError

    from stts_vllm import cli
    from stts_vllm.training import train

    seen = {}
    monkeypatch.setattr(train, "train", lambda config: seen.setdefault("config", config))
    cli.main(["train", "out", "--init", "base", "--tasks", "[direction,changed,direction]"])
    assert seen["config"].tasks == ("direction", "changed", "direction")
    with pytest.raises((ValidationError, SystemExit), match="direction"):
        cli.main(["train", str(tmp_path / "run"), "--tasks", "[colour]"])
    assert not (tmp_path / "run").exists()


def test_until_reaches_the_config_from_the_command_line(monkeypatch, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from stts_vllm import cli
    from stts_vllm.training import train

    seen = {}
    monkeypatch.setattr(train, "train", lambda config: seen.setdefault("config", config))
    cli.main(["train", "out", "--init", "base", "--until", "changed=0.85,count=0.5"])
    assert seen["config"].until == {"changed": 0.85, "count": 0.5}
    with pytest.raises((ValidationError, SystemExit), match="changed"):
        cli.main(["train", str(tmp_path / "run"), "--until", "chnged=0.85"])
    assert not (tmp_path / "run").exists()


def test_a_fresh_train_builds_the_demo_the_quality_seeds_start_from(
    monkeypatch, tmp_path: Path
) -> None:
    """`train --text-layers 4 --seed 1` starts from the same demo as `quality`'s seed 1, so a
    seed can be trained (and resumed to more steps) by hand and then evaluated by `quality`."""
    import json

    from stts_vllm import cli
    from stts_vllm.training import train

    seen = {}
    monkeypatch.setattr(train, "train", lambda config: seen.__setitem__("config", config))
    cli.main(["train", str(tmp_path / "run"), "--text-layers", "4", "--seed", "1"])
    config = seen["config"]
    assert config.init == tmp_path / "run" / "init" and config.seed == 1
    text = json.loads((config.init / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == 4 and text["max_window_layers"] == 4
    args = QualityConfig(
        out=tmp_path, init=None, family="qwen2_5_vl", text_layers=4, mode="scratch"
    )
    quality._train_seed(args, 1, tmp_path / "seed-1")
    assert seen["config"].init == tmp_path / "seed-1" / "init"
    for name in ("model.safetensors", "stts_scorer.safetensors"):
        assert (tmp_path / "seed-1" / "init" / name).read_bytes() == (
            config.init / name
        ).read_bytes()


def test_the_eval_rows_cover_every_method_at_every_budget() -> None:
    """Every method at each ratio, both selections for STTS, the distractor split at 0.5 and
    at the smallest ratio (where few neighbours of a dropped unit survive), and test-time
    scaling for both scorers."""
    from stts_vllm.eval.modes import default_modes

    names = {m.name for m in default_modes((0.5, 0.3, 0.2), ("per_step",))}
    methods = ("random", "evs", "heuristic", "learned")
    for keep in (0.5, 0.3, 0.2):
        assert {f"test/{m}@{keep}/16f" for m in methods} <= names
        assert {f"test/{m}@{keep}/per_step/16f" for m in ("heuristic", "learned")} <= names
    assert {f"distractor/{m}@{k}/16f" for m in methods for k in (0.5, 0.2)} <= names
    assert not any(n.startswith("distractor/") and "@0.3" in n for n in names)
    assert {"test/none/16f", "distractor/none/16f", "long/none/16f"} <= names
    assert {f"long/{m}@0.5/32f" for m in ("heuristic", "learned")} <= names
    only_half = {m.name for m in default_modes((0.5,), ())}
    assert {n for n in only_half if n.startswith("distractor/")} == {
        "distractor/none/16f",
        *(f"distractor/{m}@0.5/16f" for m in methods),
    }


def _train_command(argv: list[str]) -> None:
    from stts_vllm import cli

    cli.main(["train", *argv])


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": _train_command,
    "quality": quality.main,
}
"""The two front ends of training, which share `TrainingKnobs` and its checks."""


@pytest.mark.parametrize("command", COMMANDS)
def test_a_demo_without_llm_layers_is_refused_before_anything_is_built(
    command: str, tmp_path: Path
) -> None:
    from pydantic import ValidationError

    with pytest.raises((ValidationError, SystemExit), match="greater than or equal to 1"):
        COMMANDS[command]([str(tmp_path / "run"), "--text-layers", "0"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--answer-loss-on", "top_k"], "needs policy_weight"),
        (["--policy-weight", "2"], "needs explore"),
    ],
)
def test_exploration_knobs_that_disagree_are_refused_before_anything_is_built(
    command: str, flags: list[str], message: str, tmp_path: Path
) -> None:
    from pydantic import ValidationError

    with pytest.raises((ValidationError, SystemExit), match=message):
        COMMANDS[command]([str(tmp_path / "run"), *flags])
    assert not (tmp_path / "run").exists()


def test_a_saturated_scorer_keeps_units_in_every_step(tmp_path: Path) -> None:
    """Every learned score exactly 1.0 (a saturated sigmoid): at keep 0.2 the 22 units left
    after the first step spread over all seven later steps. Taken in position order they
    filled step 1 and left six steps empty, which is what the exploration runs' scorer did."""
    from safetensors.torch import load_file

    checkpoint = make_demo(tmp_path / "m", scorer="learned")
    weights = load_file(str(checkpoint / SCORER_FILE))
    last = max(int(k.rsplit(".", 2)[-2]) for k in weights if ".mlp." in k)
    weights[f"stts_scorer.mlp.{last}.weight"].zero_()
    weights[f"stts_scorer.mlp.{last}.bias"].fill_(50.0)
    scorer_state_dict_to_file(weights, checkpoint / SCORER_FILE)
    assert empty_steps(checkpoint, 2, 0.2)["learned"] == 0
