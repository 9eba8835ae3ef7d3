"""Seconds-long runs of the engine benchmark, the load test and the soak: they must produce
well-formed results (every field, every method, a plot), whatever the speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stts_vllm.families import family_named

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path, *extra: str, smoke: bool = True) -> Any:
    from tests.processes import server_env

    flags = ["--smoke"] if smoke else []
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *flags, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=ROOT,
        env=server_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(next(out.glob("*.json")).read_text())


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_engine_benchmark_smoke(tmp_path: Path, family: str) -> None:
    report = _run("bench/engine.py", tmp_path, "--family", family)
    assert report["architecture"] == family_named(family).stts_architecture
    methods = {row["method"] for row in report["rows"]}
    assert methods == {"stock", "keep 1.0", "STTS 0.5", "STTS 0.3", "EVS 0.5"}
    for row in report["rows"]:
        for key in ("encoder_seconds", "prefill_seconds", "request_seconds", "vit_gflops"):
            assert row[key] > 0, (row["method"], key)
        assert row["enc_prefill_speedup"] > 0 and row["ideal_enc_prefill_speedup"] >= 1.0
    tokens = {row["method"]: row["video_tokens"] for row in report["rows"]}
    assert tokens["STTS 0.5"] == tokens["keep 1.0"] // 2 and tokens["EVS 0.5"] < tokens["keep 1.0"]
    assert tokens["stock"] == tokens["keep 1.0"]
    assert 0 < report["scorer_packing_overhead"]["share"] < 1
    assert {t["target"] for t in report["targets"]} and (tmp_path / "engine.png").is_file()


def test_sft_step_benchmark_smoke(tmp_path: Path) -> None:
    """`train --data`'s step benchmark on a tiny model: every row, a plot."""
    report = _run("bench/sft_step.py", tmp_path, "--frames", "8", "--size", "112", "--repeats", "1")
    rows = report["rows"]
    assert [(r["frames"], r["keep"]) for r in rows] == [(8, 1.0), (8, 0.5)]
    assert rows[0]["mode"] == "full"  # auto: the first mode that fits
    assert rows[1]["llm_tokens"] < rows[0]["llm_tokens"]
    assert all(r["step_seconds"] > 0 and r["tokens_per_second"] > 0 for r in rows)
    assert (tmp_path / "sft_step.png").stat().st_size > 0


@pytest.mark.timeout(900)
def test_load_test_smoke(tmp_path: Path) -> None:
    report = _run("loadtests/chat_load.py", tmp_path, "--launch", "--turns", "2")
    levels = report["levels"]
    assert {(lv["config"], lv["concurrency"]) for lv in levels} == {
        (c, n) for c in ("unpruned", "stts", "evs") for n in (1, 2)
    }
    for level in levels:
        assert level["errors"] == 0, level["error_examples"]
        assert level["requests"] >= 2 and level["requests_per_second"] > 0
        assert level["latency_seconds"]["p50"] > 0 and level["ttft_seconds"]["p50"] > 0
        # two-turn conversations: both turns measured apart (the second reuses the video prefix)
        assert level["ttft_first_turn_seconds"]["p50"] > 0
        assert level["ttft_later_turns_seconds"]["p50"] > 0
    by = {(lv["config"], lv["concurrency"]): lv for lv in levels}
    assert by[("stts", 1)]["video_tokens_mean"] < by[("unpruned", 1)]["video_tokens_mean"]
    assert (tmp_path / "load.png").is_file()


@pytest.mark.timeout(900)
def test_soak_smoke(tmp_path: Path) -> None:
    """Every scenario of the soak runs against the real server and gets what it should; the
    run ends with a drain (the script exits 1 on any 5xx, lost upload or unclean drain)."""
    report = _run("loadtests/soak.py", tmp_path)
    assert report["server_errors_5xx"] == 0 and report["failure_count"] == 0
    scenarios = {key.split(":")[0] for key in report["outcomes"]}
    assert scenarios >= {"video", "stream", "oversized_upload", "bad_key", "upload_delete"}
    assert report["valid_answered"] > 0 and report["peak_rss_gib"] > 0
    assert (tmp_path / "soak.png").is_file()


@pytest.mark.timeout(900)
def test_router_load_smoke(tmp_path: Path) -> None:
    """Two replicas behind the real vllm-router: a single-server row and a policy row, each
    with first/later-turn TTFT and where later turns landed; a target; a plot."""
    report = _run("loadtests/router_load.py", tmp_path)
    rows = {row["config"]: row for row in report["rows"]}
    assert set(rows) == {"single", "consistent_hash"}
    for row in rows.values():
        assert row["errors"] == 0 and row["later_turns"] == 2, row
        assert row["ttft_first_turn_p50"] > 0 and row["ttft_later_turns_p50"] > 0, row
        assert 0 <= row["share_on_holding_replica"] <= 1, row
        assert sum(row["chat_requests_per_replica"]) == row["requests"], row
    assert rows["single"]["chat_requests_per_replica"][1] == 0  # one replica, no router
    (target,) = report["targets"]
    assert target["measured"] > 0 and (tmp_path / "router_load.png").stat().st_size > 0


def test_video_batches_benchmark_smoke(tmp_path: Path) -> None:
    """Videos through the pruned tower one call each vs packed: a row per size, the packed
    embeddings equal to the single ones, a plot."""
    (row,) = _run("bench/video_batches.py", tmp_path)
    assert row["videos"] == 3 and row["one_call_each_seconds"] > 0 < row["one_packed_call_seconds"]
    assert row["max_abs_difference"] < 1e-4 and row["speedup"] > 0
    assert (tmp_path / "video_batches.png").stat().st_size > 0


def test_vision_tower_benchmark_smoke(tmp_path: Path) -> None:
    """The tower benchmark on a shallow tower: every pass, tower and keep ratio, a plot."""
    args = ["--depth", "4", "--size", "112", "--frames", "8", "--repeats", "1"]
    rows = _run("bench/vision_tower.py", tmp_path, *args, smoke=False)
    seen = {(r["pass"], r["tower"], r["keep_ratio"]) for r in rows}
    assert {("forward", "stock", 1.0), ("train", "stts", 0.5)} <= seen
    assert all(r["seconds_median"] > 0 for r in rows)
    assert (tmp_path / "vision_tower.png").stat().st_size > 0


def test_train_step_benchmark_smoke(tmp_path: Path) -> None:
    """The training-step benchmark on the demo: a row per (blocks, keep ratio), a plot."""
    from stts_vllm.demo import make_demo

    demo = str(make_demo(tmp_path / "demo"))
    args = [demo, "--batch-size", "2", "--frames", "8", "--keep", "1.0", "0.5", "--repeats", "1"]
    rows = _run("bench/train_step.py", tmp_path / "out", *args, smoke=False)
    assert [(r["blocks"], r["keep_ratio"]) for r in rows] == [
        ("batched", 1.0),
        ("batched", 0.5),
        ("stock", 1.0),
        ("stock", 0.5),
    ]
    assert rows[1]["video_tokens"] < rows[0]["video_tokens"]
    assert all(r["step_seconds_median"] > 0 for r in rows)
    assert (tmp_path / "out/train_step.png").stat().st_size > 0
