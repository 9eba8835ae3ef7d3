"""One implementation: a checkpoint trained by `stts-vllm train` (transformers) is served by the
vLLM plugin with the training model's own numbers, `stts-vllm eval` runs every method, and the
quality study (`experiments/quality.py`) evaluates and aggregates trained seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.quality import QualityConfig, run_quality
from stts_vllm.core import retained_count
from stts_vllm.eval.config import EvalConfig
from stts_vllm.eval.run import run_eval
from stts_vllm.eval.runners import video_metadata
from stts_vllm.training.model import STTSVideoQAModel, chat_prompt
from stts_vllm.training.videoqa import make_sample
from tests.training.helpers import qwen3_scorer_run, smoke_run  # noqa: F401  (fixtures)


@pytest.mark.parametrize("keep", [0.5, 1.0])
@pytest.mark.parametrize("run", ["smoke_run", "qwen3_scorer_run"])
def test_vllm_gives_the_training_models_logprobs(
    run: str, request: pytest.FixtureRequest, engines, keep: float
) -> None:
    """Both families, trained from scratch (Qwen2.5-VL) and scorer-only on a frozen base
    (Qwen3-VL): vLLM serves the trained checkpoint with the training model's numbers."""
    from vllm import SamplingParams

    checkpoint = request.getfixturevalue(run) / "checkpoint"
    samples = [make_sample(i, "test") for i in range(4)]
    model = STTSVideoQAModel.from_checkpoint(checkpoint)
    model.eval()
    with torch.no_grad():
        out = model([model.prepare(s) for s in samples], [keep] * len(samples))
    llm = engines.get(checkpoint)
    video_pad = model.video_pad
    results = llm.generate(
        [
            {
                "prompt": chat_prompt(model.tokenizer, s.question),
                "multi_modal_data": {"video": [(s.frames, video_metadata(s))]},
                "mm_processor_kwargs": {"stts_keep_ratio": keep},
            }
            for s in samples
        ],
        SamplingParams(temperature=0.0, max_tokens=1, logprobs=5),
        use_tqdm=False,
    )
    for result, logits, tokens in zip(results, out.answer_logits, out.video_tokens, strict=True):
        assert result.prompt_token_ids.count(video_pad) == tokens
        hf = torch.log_softmax(logits.float(), dim=-1)
        top = result.outputs[0].logprobs[0]
        assert result.outputs[0].token_ids[0] == int(hf.argmax())
        for token_id, logprob in top.items():
            assert abs(logprob.logprob - float(hf[token_id])) < 1e-3, (token_id, logprob)


def test_eval_runs_every_method_and_writes_json_and_png(smoke_run: Path, engines, tmp_path) -> None:  # noqa: F811
    engines.close()  # the eval starts its own engines, one at a time
    config = EvalConfig(
        checkpoint=smoke_run / "checkpoint",
        out=tmp_path / "eval",
        samples=3,
        ratios=(0.5, 0.2),
        methods=("none", "random", "evs", "heuristic", "learned"),
        long=True,
        distractor=True,
        selections=None,  # the demo is Qwen2.5-VL (global top-k): per_step rows too
        server=None,
        api_key=None,
        compare_hf=3,
    )
    report = run_eval(config)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 1000
    rows = {r["mode"]: r for r in saved["results"]}
    assert set(rows) >= {
        "test/none/16f",
        "test/random@0.5/16f",
        "test/evs@0.5/16f",
        "test/heuristic@0.5/16f",
        "test/learned@0.5/16f",
        "long/learned@0.5/32f",
        "long/heuristic@0.5/32f",
        "test/learned@0.2/16f",
        "test/learned@0.5/per_step/16f",
        "test/heuristic@0.2/per_step/16f",
        "distractor/none/16f",
        "distractor/learned@0.5/16f",
        "distractor/heuristic@0.5/16f",
        "distractor/random@0.5/16f",
    }
    assert rows["test/learned@0.5/per_step/16f"]["selection"] == "per_step"
    assert rows["test/learned@0.2/16f"]["video_tokens_mean"] == retained_count(8, 36, 0.2)
    assert set(rows["distractor/learned@0.5/16f"]["by_task"]) == {"distractor"}
    assert rows["test/none/16f"]["video_tokens_mean"] == 288
    for name in ("random", "heuristic", "learned"):
        assert rows[f"test/{name}@0.5/16f"]["video_tokens_mean"] == 144
    assert rows["test/evs@0.5/16f"]["video_tokens_mean"] < 288
    assert rows["long/learned@0.5/32f"]["video_tokens_mean"] == 288  # 2x frames, same budget
    for row in rows.values():
        assert row["samples"] == 3 and 0 <= row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    agreement = saved["hf_agreement"]
    assert agreement["same_answers"] == agreement["samples"] == 3


def test_quality_driver_evaluates_a_trained_seed_and_aggregates(
    smoke_run: Path,  # noqa: F811
    engines,
    tmp_path: Path,
) -> None:
    """The quality study on one seed whose training is already done (reused, not rerun):
    every row is evaluated through vLLM and aggregated, the targets are checked, JSON + PNG."""
    import shutil

    engines.close()
    out = tmp_path / "quality"
    shutil.copytree(smoke_run / "checkpoint", out / "seed-0" / "checkpoint")
    args = QualityConfig(
        out=out,
        seeds=[0],
        init=None,
        mode="scratch",
        family="qwen2_5_vl",
        text_layers=2,
        train_fields={},
        samples=2,
        ratios=[0.5],
        unit_samples=4,
    )
    result = run_quality(args)
    saved = json.loads((out / "quality.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (out / "quality.png").stat().st_size > 1000
    rows = {r["mode"]: r for r in saved["rows"]}
    assert {"distractor/learned@0.5/16f", "test/learned@0.5/per_step/16f"} <= set(rows)
    assert all(r["questions"] == 2 and len(r["seed_accuracies"]) == 1 for r in rows.values())
    checks = {t["target"]: t for t in saved["targets"]}
    assert checks["distractor: learned - random @0.5"]["met"] in (True, False)
    assert checks["test: learned - random @0.2"]["met"] is None  # keep 0.2 was not run
    assert not (out / "seed-0" / "last").exists()  # training was reused, not rerun
    (kept,) = saved["distractor_answer_unit_kept@0.5"]
    assert set(kept) == {"random (expected)", "heuristic", "learned"}
    assert all(0.0 <= rate <= 1.0 for rate in kept.values())
    assert kept["random (expected)"] == pytest.approx((retained_count(8, 36, 0.5) - 36) / (7 * 36))


def test_quality_in_scorer_mode_evaluates_the_base_once_and_each_seeds_scorer(
    smoke_run: Path,  # noqa: F811
    engines,
    tmp_path: Path,
) -> None:
    """`python -m experiments.quality --init BASE --mode scorer`: the scorer-free rows come
    from one eval of the frozen base, the learned rows from one eval per seed's trained
    scorer."""
    engines.close()
    out = tmp_path / "quality"
    base = smoke_run / "checkpoint"
    args = QualityConfig(
        out=out,
        seeds=[0, 1],
        init=base,
        mode="scorer",
        family="qwen2_5_vl",
        text_layers=2,
        train_fields={
            "steps": 2,
            "batch_size": 2,
            "warmup": 1,
            "keep_ratios": [0.5],
            "eval_samples": 2,
            "scorer_lr": 5e-3,
            "aux_weight": 0.0,
        },
        samples=2,
        ratios=[0.5],
        unit_samples=3,
    )
    run_quality(args)
    saved = json.loads((out / "quality.json").read_text())
    base_modes = {
        r["mode"] for r in json.loads((out / "base/eval/eval.json").read_text())["results"]
    }
    assert "distractor/heuristic@0.5/16f" in base_modes
    assert not any("learned" in mode for mode in base_modes)
    for seed in (0, 1):
        report = json.loads((out / f"seed-{seed}/eval/eval.json").read_text())
        assert {r["method"] for r in report["results"]} == {"learned"}
        trained = load_file(out / f"seed-{seed}/checkpoint/model.safetensors")
        frozen = load_file(base / "model.safetensors")
        assert trained.keys() == frozen.keys()
        assert all(torch.equal(trained[k], v) for k, v in frozen.items())
        scorer = load_file(out / f"seed-{seed}/checkpoint/stts_scorer.safetensors")
        before = load_file(base / "stts_scorer.safetensors")
        assert any(not torch.equal(scorer[k], v) for k, v in before.items())
    rows = {r["mode"]: r for r in saved["rows"]}
    assert len(rows["distractor/heuristic@0.5/16f"]["seed_accuracies"]) == 1
    assert len(rows["distractor/learned@0.5/16f"]["seed_accuracies"]) == 2
    assert rows["distractor/learned@0.5/16f"]["questions"] == 4
    assert saved["base"] == str(base)
    assert set(saved["distractor_answer_unit_kept@0.5 (base scorer)"]) == {
        "random (expected)",
        "heuristic",
        "learned",
    }
    assert len(saved["distractor_answer_unit_kept@0.5"]) == 2
    assert (out / "quality.png").stat().st_size > 1000
