"""The *changed* probe (`experiments/probe_changed.py`): its unit roles follow the generator's
metadata, its oracle keeps both shapes whole, and a run on a trained checkpoint writes its
report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import probe_changed as probe
from stts_vllm.core.selection import retention_mask
from stts_vllm.training.videoqa import make_sample
from tests.training.helpers import ROOT


@pytest.mark.parametrize("seed", range(6))
def test_roles_follow_the_metadata_and_the_oracle_keeps_both_shapes(seed: int) -> None:
    sample = make_sample(seed, "val", task="changed")
    roles = probe.unit_roles(sample, 8)
    names = probe.ROLES
    change_step = sample.meta["change"] // 2
    r, c = sample.meta["moved"]["units"][0]
    moved = [names[i] for i in roles[:, r * probe.GRID + c]]
    assert moved.index("moved at change") == change_step and moved.count("moved at change") == 1
    assert set(moved[:change_step]) <= {"moved before"} and set(moved[change_step + 1 :]) <= {
        "moved after"
    }
    shapes = len(sample.meta["moved"]["units"]) + len(sample.meta["still"]["units"])
    assert (roles[0] != names.index("background")).sum() == shapes
    scores = probe.OracleScorer(sample, seed)(torch.zeros(8, probe.GRID**2, 4, 8))
    mask = retention_mask(scores, 0.5).numpy()
    assert mask[roles != names.index("background")].all()  # every shape unit, every step
    assert 0 < mask[1:][roles[1:] == names.index("background")].mean() < 0.5


@pytest.mark.timeout(600)
def test_a_probe_run_writes_every_row(smoke_run: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.probe_changed",
            str(smoke_run / "checkpoint"),
            "--out",
            str(tmp_path),
            "--clips",
            "2",
            "--keep",
            "1.0",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "probe.json").read_text())["rows"]
    assert [(r["selection"], r["keep"]) for r in rows] == [
        ("none", 1.0),
        *[(s, 0.5) for s in ("learned", "heuristic", "random", "oracle")],
    ]
    oracle = rows[-1]
    assert oracle["kept/still"] == 1.0 and oracle["kept/moved after"] == 1.0
    for row in rows[1:]:
        shares = [row[f"kept/{role}"] for role in probe.ROLES]
        assert all(0.0 <= s <= 1.0 for s in shares) and np.isfinite(row["accuracy"])
    assert (tmp_path / "probe.png").is_file()
