"""The position probe (`experiments/probe_position.py`): its labels come from the pixels the
way the answers do, its probe separates what is separable and not what is not, and a run on a
trained checkpoint writes every probe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import probe_position as probe
from stts_vllm.training.videoqa import SIZE, make_sample
from tests.training.helpers import ROOT


def test_the_shape_starts_on_the_side_it_moves_away_from() -> None:
    for seed in range(24):
        sample = make_sample(seed, "test", task="direction")
        _, x = probe.shape_box(sample.frames[0])
        assert (x < SIZE / 2) == (sample.answer == "right"), seed


def test_the_probe_separates_a_signal_and_not_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=generator, dtype=torch.float64)
    signal = (x[:, 3] > 0).long()
    result = probe.fit_probe(x[:200], signal[:200], x[200:], signal[200:])
    assert result["held_out"] >= 0.95
    noise = torch.randint(0, 2, (300,), generator=generator)
    result = probe.fit_probe(x[:200], noise[:200], x[200:], noise[200:])
    assert result["held_out"] <= 0.7 and 0.4 <= result["chance"] <= 0.65


@pytest.mark.timeout(600)
def test_a_probe_run_writes_every_probe(smoke_run: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.probe_position",
            str(smoke_run / "checkpoint"),
            "--out",
            str(tmp_path),
            "--fit",
            "8",
            "--held-out",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "probe.json").read_text())
    config = json.loads((smoke_run / "checkpoint" / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"]
    names = set(report["probes"])
    assert {"token -> side", "token -> color", "track mean -> side", "llm/0 -> side"} <= names
    assert len([n for n in names if n.startswith("llm/")]) == layers + 1
    for values in report["probes"].values():
        assert 0.0 <= values["held_out"] <= 1.0 and 0.0 < values["chance"] <= 1.0
    assert (tmp_path / "probe.png").is_file()


def test_the_variance_share_measures_how_loud_a_label_is() -> None:
    generator = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (400,), generator=generator)
    noise = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    loud = noise + 10.0 * y[:, None]
    quiet = noise + 0.1 * y[:, None]
    assert probe.between_class_share(loud, y) > 0.9
    assert probe.between_class_share(quiet, y) < 0.01
