"""`stts-vllm train --data` on tiny checkpoints of both families and generated clips: it
overfits four records in each mode, leaves the base bit-identical in `scorer` mode, steps the
same on two processes as on one, resumes exactly, and writes a checkpoint `stts-serve` serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from media import encode_video, moving_square_video
from safetensors.torch import load_file

from stts_vllm.demo import make_demo
from stts_vllm.training import sft_train
from stts_vllm.training.sft_config import SFTConfig
from stts_vllm.training.sft_train import LOG_FILE, train_sft

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four two-turn records about four 3 s clips, and the demo checkpoints."""
    root = tmp_path_factory.mktemp("sft-train")
    rows = []
    for i in range(4):
        clip = encode_video(moving_square_video(12, 64, 80, seed=i), fps=4)
        (root / f"c{i}.mp4").write_bytes(clip)
        rows.append(
            {
                "video": f"c{i}.mp4",
                "conversations": [
                    {"from": "human", "value": "<video>\nWhat moves?"},
                    {"from": "gpt", "value": f"A square, number {i}."},
                    {"from": "human", "value": "Which way?"},
                    {"from": "gpt", "value": "Right." if i % 2 else "Left."},
                ],
            }
        )
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for family in ("qwen2_5_vl", "qwen3_vl"):
        make_demo(root / family, family=family)
    return root


def _config(data: Path, out: Path, family: str = "qwen2_5_vl", **fields) -> SFTConfig:
    fields = {
        "steps": 30,
        "warmup": 2,
        "max_tokens_per_step": 200,  # about two records a micro-batch
        "max_frames": 8,
        "workers": 1,
        "save_every": 100,
        "lr": 3e-3,
        "scorer_lr": 1e-2,
    } | fields
    return SFTConfig(
        init=data / family, out=out, data=(data / "data.jsonl",), video_root=data, **fields
    )


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


@pytest.mark.parametrize(
    ("family", "mode", "key", "factor"),
    [
        # the scorer alone moves the LM loss little (only through the key bias of one
        # block); its own loss, the temporal one, falls
        ("qwen2_5_vl", "scorer", "temporal_loss", 5.0),
        ("qwen3_vl", "scorer", "temporal_loss", 5.0),
        ("qwen2_5_vl", "full", "lm_loss", 5.0),
        ("qwen3_vl", "full", "lm_loss", 5.0),
        ("qwen2_5_vl", "lora", "lm_loss", 1.3),
    ],
)
def test_four_records_are_overfitted(
    data: Path, tmp_path: Path, family: str, mode: str, key: str, factor: float
) -> None:
    out = tmp_path / "out"
    checkpoint = train_sft(_config(data, out, family, mode=mode))
    rows = _log(out)
    assert len(rows) == 30
    first, last = _mean(rows[:3], key), _mean(rows[-3:], key)
    assert last * factor < first, (mode, key, first, last)
    if mode == "scorer":
        assert _mean(rows[-3:], "lm_loss") < _mean(rows[:3], "lm_loss") * 1.01
    assert (checkpoint / "config.json").is_file() and (out / "loss.png").stat().st_size > 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_scorer_mode_links_the_base_and_refuses_to_change_it(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = train_sft(_config(data, tmp_path / "out", steps=3))
    weights = checkpoint / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (data / "qwen2_5_vl/model.safetensors")
    scorer = load_file(str(checkpoint / "stts_scorer.safetensors"))
    assert scorer and all(k.startswith("stts_scorer.") for k in scorer)
    # a bug that let one base weight train is caught before anything is written
    set_trainable = sft_train.set_trainable

    def leaky(model, mode: str) -> None:
        set_trainable(model, mode)
        model.hf.lm_head.weight.requires_grad_(True)

    monkeypatch.setattr(sft_train, "set_trainable", leaky)
    with pytest.raises(RuntimeError, match="scorer mode changed base weights"):
        train_sft(_config(data, tmp_path / "leaky", steps=3))
    assert not (tmp_path / "leaky" / "checkpoint").exists()


def _torchrun(args: list[str], out: Path) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stts_vllm.cli"]
    run = subprocess.run(
        [*argv, "train", str(out), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]


def _cli(args: list[str], out: Path) -> None:
    argv = [sys.executable, "-m", "stts_vllm.cli", "train", str(out), *args]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]


@pytest.mark.parametrize("mode", ["scorer", "full"])  # DDP, FSDP2
def test_two_processes_step_as_one_on_the_combined_batch(
    data: Path, tmp_path: Path, mode: str
) -> None:
    """One record per micro-batch: two processes with one micro-batch each, against one
    process accumulating two: the same records, keep ratios and normalised loss, so the same
    gradients (Adam's first moments after one step) and weights."""
    common = ["--data", str(data / "data.jsonl"), "--video-root", str(data)]
    common += ["--init", str(data / "qwen2_5_vl"), "--mode", mode, "--steps", "1"]
    common += ["--max-tokens-per-step", "1", "--max-frames", "8", "--workers", "0"]
    common += ["--warmup", "1", "--lr", "1e-3", "--scorer-lr", "1e-3"]
    _torchrun(common, tmp_path / "two")
    _cli([*common, "--grad-accum", "2"], tmp_path / "one")
    (two,), (one,) = _log(tmp_path / "two"), _log(tmp_path / "one")  # rank 0 alone logs
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (two["samples"], two["targets"], two["video_tokens"]) == (
        one["samples"],
        one["targets"],
        one["video_tokens"],
    )
    assert two["samples"] == 2 and abs(two["loss"] - one["loss"]) < 1e-5 * one["loss"]

    def moments(run: str) -> dict[str, torch.Tensor]:
        state = torch.load(tmp_path / run / "last" / sft_train.STATE_FILE, weights_only=False)
        return {name: s["exp_avg"] for name, s in state["optimizer"]["state"].items()}

    got, want = moments("two"), moments("one")
    assert got.keys() == want.keys() and any("scorer" in name for name in want)
    if mode == "full":
        assert any("language_model" in name for name in want)
    scale = max(float(value.abs().max()) for value in want.values())  # the largest gradient
    for name, value in want.items():
        assert torch.allclose(got[name], value, rtol=1e-3, atol=1e-5 * scale), name
    # Adam turns a weight's float-noise gradient (one with none in exact arithmetic, e.g. the
    # attention pool's key bias) into a step of up to lr; every other weight agrees closely
    names = ["stts_scorer.safetensors"] + (["model.safetensors"] if mode == "full" else [])
    for name in names:
        got_w = load_file(str(tmp_path / "two" / "checkpoint" / name))
        want_w = load_file(str(tmp_path / "one" / "checkpoint" / name))
        assert got_w.keys() == want_w.keys()
        for key in want_w:
            assert torch.allclose(got_w[key], want_w[key], rtol=1e-4, atol=1e-3), key


def test_resume_continues_where_the_run_stopped(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after step 3 of 6 (saved at 2 and 4... so at 2), resumed: the same weights and
    log as a run that never stopped."""
    whole = train_sft(_config(data, tmp_path / "whole", mode="full", steps=6, save_every=2))
    step = sft_train._step
    calls = {"n": 0}

    def dies_on_step_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(sft_train, "_step", dies_on_step_four)
    config = _config(data, tmp_path / "cut", mode="full", steps=6, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train_sft(config)
    monkeypatch.setattr(sft_train, "_step", step)
    assert [r["step"] for r in _log(tmp_path / "cut")] == [1, 2, 3]
    resumed = train_sft(
        _config(data, tmp_path / "cut", mode="full", steps=6, save_every=2, resume=True)
    )
    rows, reference = _log(tmp_path / "cut"), _log(tmp_path / "whole")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows, reference, strict=True):
        assert (a["samples"], a["targets"]) == (b["samples"], b["targets"])
        assert abs(a["loss"] - b["loss"]) < 1e-4 * b["loss"], (a["step"], a["loss"], b["loss"])
    got, want = (
        load_file(str(resumed / "model.safetensors")),
        load_file(str(whole / "model.safetensors")),
    )
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-4, atol=1e-6), key


def test_bad_records_stop_the_run_or_are_counted(data: Path, tmp_path: Path) -> None:
    rows = (data / "data.jsonl").read_text().splitlines()
    bad = json.loads(rows[0]) | {"video": "missing.mp4"}
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([*rows, json.dumps(bad)]) + "\n")
    config = _config(data, tmp_path / "strict", steps=2)
    config.data = (path,)
    with pytest.raises(ValueError, match=rf"{path}:5: video file not found"):
        train_sft(config)
    config = _config(data, tmp_path / "lenient", steps=2, skip_bad=True)
    config.data = (path,)
    train_sft(config)
    summary = json.loads((tmp_path / "lenient" / "train_summary.json").read_text())
    assert summary["data"]["records"] == 4
    assert summary["data"]["skipped_by_kind"] == {"missing_file": 1}


def test_bfloat16_and_gradient_checkpointing_train_alike(data: Path, tmp_path: Path) -> None:
    """Recomputing the LLM's activations changes no number; bfloat16 autocast stays near
    float32's loss."""
    runs = {}
    for name, fields in {
        "plain": {},
        "checkpointed": {"gradient_checkpointing": True},
        "bf16": {"dtype": "bfloat16"},
    }.items():
        train_sft(_config(data, tmp_path / name, mode="full", steps=3, **fields))
        runs[name] = [r["loss"] for r in _log(tmp_path / name)]
    assert runs["checkpointed"] == pytest.approx(runs["plain"], rel=1e-5)
    assert runs["bf16"] == pytest.approx(runs["plain"], rel=2e-2)


def test_the_command_line_keeps_the_two_trainers_apart(data: Path, tmp_path: Path) -> None:
    from stts_vllm.cli import main

    base = ["train", str(tmp_path / "x"), "--data", str(data / "data.jsonl")]
    cases = {
        "--frames": [*base, "--init", str(data / "qwen2_5_vl"), "--frames", "[8]"],
        "--mode scratch": [*base, "--init", str(data / "qwen2_5_vl"), "--mode", "scratch"],
        "needs --init": base,
        "need --data": ["train", str(tmp_path / "y"), "--workers", "3"],
        "--mode lora needs --data": ["train", str(tmp_path / "z"), "--mode", "lora"],
    }
    for expected, argv in cases.items():
        with pytest.raises(Exception, match=expected):
            main(argv)
    assert not any((tmp_path / name).exists() for name in "xyz")  # refused before any work
