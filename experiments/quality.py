"""The quality study: what the learned scorer buys, in one command.

    .venv/bin/python -m experiments.quality artifacts/quality --seeds '[0,1,2]'

Trains the tiny model from several seeds (or only the scorer of a frozen base, `--mode
scorer --init CKPT`), runs the evaluator (`stts-vllm eval`) on each result (every method at
keep 0.5 / 0.3 / 0.2, both selections, the distractor split, test-time scaling), and
aggregates the rows over seeds: mean, each seed's accuracy, and a 95% interval pooled over
all seeds' questions. A seed's finished training or eval is reused, so a stopped run picks up
where it was. Writes OUT/quality.json and OUT/quality.png and checks the quality targets,
reporting misses as misses. Flags: `--help`; findings: experiments/README.md.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import CliApp, CliPositionalArg, CliSettingsSource

from stts_vllm.eval.config import EvalConfig
from stts_vllm.eval.plots import method_color, save_accuracy_plot
from stts_vllm.eval.report import wilson
from stts_vllm.training.knobs import TrainingKnobs

TARGET_MARGIN = 0.05  # learned over heuristic / random on the distractor split, at keep 0.5


@dataclass
class Row:
    """One eval row over seeds."""

    mode: str
    method: str
    keep: float
    split: str
    accuracies: list[float] = field(default_factory=list)
    correct: int = 0
    total: int = 0
    video_tokens: float = 0.0

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    def summary(self) -> dict[str, Any]:
        lo, hi = wilson(self.correct, self.total)
        return {
            "mode": self.mode,
            "method": self.method,
            "keep": self.keep,
            "split": self.split,
            "mean_accuracy": self.mean,
            "seed_accuracies": self.accuracies,
            "spread": [min(self.accuracies), max(self.accuracies)],
            "pooled_ci95": [lo, hi],
            "questions": self.total,
            "video_tokens_mean": self.video_tokens,
        }


def aggregate(reports: Sequence[dict]) -> dict[str, Row]:
    """Rows by mode name, over the seeds' `eval.json` reports (each must hold the row)."""
    rows: dict[str, Row] = {}
    for report in reports:
        for r in report["results"]:
            row = rows.setdefault(r["mode"], Row(r["mode"], r["method"], r["keep"], r["split"]))
            row.accuracies.append(r["accuracy"])
            row.correct += round(r["accuracy"] * r["samples"])
            row.total += r["samples"]
            row.video_tokens = r["video_tokens_mean"]
    return rows


def targets(rows: dict[str, Row]) -> list[dict[str, Any]]:
    """The issue's targets, on seed means; a row that was not run gives `met: None`. Each
    also gives the gap per seed (`per_seed`), because seeds differ far more than the pooled
    intervals of one row suggest: a gap is convincing when every seed shows it.

    A gap of the learned scorer over another pruned method also gets its `headroom`: keep 1.0
    on the same split minus that method. A scorer that answered as if nothing were pruned
    would show exactly the headroom, so a goal above it tells that the split, not the scorer,
    stands in the way (pruning rarely answers better than the whole clip)."""

    out: list[dict[str, Any]] = []

    def add(name: str, a: str, b: str, goal: float) -> None:
        x, y = rows.get(a), rows.get(b)
        value = None if x is None or y is None else x.mean - y.mean
        headroom = None
        full = rows.get(f"{b.split('/')[0]}/none/16f")
        if y is not None and full is not None and y.method != "none" and "/learned@" in a:
            headroom = full.mean - y.mean
        per_seed = None
        if x is not None and y is not None:
            # scorer mode: the base rows hold one value, shared by every seed's learned row
            ys = y.accuracies * len(x.accuracies) if len(y.accuracies) == 1 else y.accuracies
            if len(ys) == len(x.accuracies):
                per_seed = [p - q for p, q in zip(x.accuracies, ys, strict=True)]
        met = None if value is None else value >= goal - 1e-12
        out.append(
            {
                "target": name,
                "measured": value,
                "per_seed": per_seed,
                "goal": goal,
                "met": met,
                "headroom": headroom,
                "reachable": None if headroom is None else headroom >= goal - 1e-12,
            }
        )

    learned = "distractor/learned@0.5/16f"
    add("distractor: learned - heuristic @0.5", learned, "distractor/heuristic@0.5/16f", 0.05)
    add("distractor: learned - random @0.5", learned, "distractor/random@0.5/16f", 0.05)
    add(
        "test: learned@0.5 - keep 1.0 (>= -1 point)",
        "test/learned@0.5/16f",
        "test/none/16f",
        -0.01,
    )
    for keep in (0.3, 0.2):
        add(
            f"test: learned - random @{keep}",
            f"test/learned@{keep}/16f",
            f"test/random@{keep}/16f",
            0.03,
        )
    for method in ("learned", "heuristic"):
        add(
            f"long: {method}@0.5 32f - keep 1.0 16f (equal tokens)",
            f"long/{method}@0.5/32f",
            "long/none/16f",
            0.0,
        )
    return out


def _distractor_masks(checkpoint: Path, count: int, keep: float, scorer: str):
    """Per distractor clip: the sample and each STTS scorer's keep mask over the `[T, U]`
    unit grid (None when the checkpoint's unit grid is another one)."""
    import torch

    from stts_vllm.core import retention_mask
    from stts_vllm.training.model import STTSVideoQAModel
    from stts_vllm.training.videoqa import make_sample

    model = STTSVideoQAModel.from_checkpoint(checkpoint, scorer=scorer).eval()
    for i in range(count):
        sample = make_sample(i, "distractor")
        prepared = model.prepare(sample)
        steps = prepared.grid[0]  # temporal steps after the processor's temporal patching
        with torch.no_grad():
            scores = model([prepared], [keep]).scores[0]
        if scores is None or scores.numel() % steps:
            yield sample, None
            continue
        yield sample, retention_mask(scores.reshape(steps, -1), keep, model.stts.selection)


def answer_unit_kept(checkpoint: Path, count: int, keep: float = 0.5) -> dict[str, float | None]:
    """How often each STTS scorer keeps the unit that holds the answer on the distractor
    split (the flash's unit at its step, from the generator's metadata), and the rate a
    random choice would have. Accuracy alone can hide this: the blocks before the pruning
    point attend across units, so a dropped unit's colour can still reach the answer through
    kept neighbours."""
    from stts_vllm.core import retained_count
    from stts_vllm.training.videoqa import SIZE, UNIT

    grid = SIZE // UNIT
    out: dict[str, float | None] = {"random (expected)": None}
    for scorer in ("heuristic", "learned"):
        kept = 0
        for sample, mask in _distractor_masks(checkpoint, count, keep, scorer):
            if mask is None or mask.shape[1] != grid * grid:  # another unit grid
                out[scorer] = None
                break
            steps, units = mask.shape
            # the flash fills frames 2s and 2s+1; the mask's steps are the processor's
            frames_per_step = len(sample.frames) // steps
            row, col = sample.meta["unit"]
            kept += int(mask[2 * sample.meta["step"] // frames_per_step, row * grid + col])
            # the first step is kept whole; the rest share what is left
            out["random (expected)"] = (retained_count(steps, units, keep) - units) / (
                (steps - 1) * units
            )
        else:
            out[scorer] = kept / count
    return out


def empty_steps(checkpoint: Path, count: int, keep: float) -> dict[str, float | None]:
    """Mean number of prunable steps each STTS scorer leaves without a single kept unit, per
    distractor clip (None: no clip could be measured). A global top-k may empty steps by
    design, but a scorer that does it far more than the heuristic has collapsed onto a few
    steps (see experiments/README.md: a saturated scorer with ties in position order kept
    only the first steps)."""
    out: dict[str, float | None] = {}
    for scorer in ("heuristic", "learned"):
        empty = [
            int((mask[1:].sum(dim=1) == 0).sum())
            for _, mask in _distractor_masks(checkpoint, count, keep, scorer)
            if mask is not None
        ]
        out[scorer] = sum(empty) / len(empty) if empty else None
    return out


def table(rows: dict[str, Row]) -> str:
    lines = [f"{'mode':38} {'mean':>6} {'seeds':>22} {'pooled 95% CI':>15} {'tok':>5}"]
    for row in rows.values():
        lo, hi = wilson(row.correct, row.total)
        seeds = "/".join(f"{100 * a:.1f}" for a in row.accuracies)
        lines.append(
            f"{row.mode:38} {100 * row.mean:5.1f}% {seeds:>22} "
            f"[{100 * lo:5.1f},{100 * hi:5.1f}] {row.video_tokens:5.0f}"
        )
    return "\n".join(lines)


def plot(rows: dict[str, Row], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(rows.values())
    fig, ax = plt.subplots(figsize=(max(9, 0.45 * len(items)), 5))
    for x, row in enumerate(items):
        lo, hi = wilson(row.correct, row.total)
        ax.bar(x, 100 * row.mean, color=method_color(row.method))
        ax.errorbar(
            x,
            100 * row.mean,
            yerr=[[100 * (row.mean - lo)], [100 * (hi - row.mean)]],
            color="black",
            capsize=2,
            lw=0.8,
        )
        ax.scatter(
            [x] * len(row.accuracies),
            [100 * a for a in row.accuracies],
            s=8,
            color="black",
            zorder=3,
        )
    return save_accuracy_plot(
        fig,
        ax,
        [r.mode for r in items],
        "accuracy (%): seed mean, seeds (dots), pooled 95% CI",
        title,
        path,
        rotation=70,
        fontsize=6,
    )


BASE_METHODS = ["none", "random", "evs", "heuristic"]


@dataclass(frozen=True)
class QualityConfig:
    """One study: `train_fields` go to every seed's `TrainConfig` (steps, batch_size, ...),
    `samples` and `ratios` to every seed's eval."""

    out: Path
    seeds: Sequence[int] = (0, 1, 2)  # one training run per seed
    init: Path | None = None  # every seed starts from it (default: a fresh demo per seed)
    mode: Literal["scratch", "scorer", "scorer+llm"] = "scratch"
    family: Literal["qwen2_5_vl", "qwen3_vl"] = "qwen2_5_vl"  # of the fresh demos
    text_layers: int = 4  # LLM depth of the fresh demos (the serving demo has 2)
    train_fields: Mapping[str, Any] = field(default_factory=dict)
    samples: int = 600  # eval questions per row per seed
    ratios: Sequence[float] = (0.5, 0.3, 0.2)
    unit_samples: int = 200  # distractor clips on which to count the kept answer unit


def _eval(checkpoint: Path, out: Path, methods: list[str], config: QualityConfig) -> dict:
    """The evaluator on one checkpoint, reused when its report is already there."""
    from stts_vllm.eval.run import run_eval

    report_path = out / "eval.json"
    if not report_path.is_file():
        # The evaluator's own defaults for every other field (long, distractor, ...).
        run_eval(
            EvalConfig(
                checkpoint=checkpoint,
                out=out,
                samples=config.samples,
                ratios=tuple(config.ratios),
                methods=tuple(methods),
            )
        )
    return json.loads(report_path.read_text())


def _answer_units(checkpoint: Path, path: Path, count: int) -> dict[str, float | None]:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(answer_unit_kept(checkpoint, count), indent=2))
    return json.loads(path.read_text())


def _train_seed(config: QualityConfig, seed: int, run: Path) -> Path:
    from stts_vllm.training.train import TrainConfig, fresh_demo, train

    checkpoint = run / "checkpoint"
    if (checkpoint / "config.json").is_file():
        return checkpoint
    init = config.init or fresh_demo(run / "init", seed, config.family, config.text_layers)
    train_config = TrainConfig(
        init=Path(init),
        out=run,
        mode=config.mode,
        seed=seed,
        resume=True,
        **config.train_fields,
    )
    train(train_config)
    return checkpoint


def run_quality(config: QualityConfig) -> dict[str, Any]:
    """Trains (or reuses) every seed, evaluates it, aggregates and checks the targets.

    In `scorer` mode every seed shares the frozen base, so the rows that do not read the
    scorer (none, random, EVS, heuristic) are evaluated once, on the base, and only the
    learned rows once per seed."""
    out = Path(config.out)
    reports, answer_units = [], []
    base_units = None
    shared_base = config.mode == "scorer" and config.init is not None
    if shared_base:
        reports.append(_eval(Path(config.init), out / "base" / "eval", BASE_METHODS, config))
        base_units = _answer_units(
            Path(config.init), out / "base" / "answer_units.json", config.unit_samples
        )
    for seed in config.seeds:
        run = out / f"seed-{seed}"
        checkpoint = _train_seed(config, seed, run)
        methods = ["learned"] if shared_base else [*BASE_METHODS, "learned"]
        reports.append(_eval(checkpoint, run / "eval", methods, config))
        answer_units.append(
            _answer_units(checkpoint, run / "answer_units.json", config.unit_samples)
        )
    rows = aggregate(reports)
    checks = targets(rows)
    title = (
        f"procedural video QA, {len(config.seeds)} seed(s) x {config.samples} questions per row"
        f" ({config.mode})"
    )
    if shared_base:
        title = (
            f"procedural video QA: frozen base, scorer trained from {len(config.seeds)} seed(s);"
            f" {config.samples} questions per row per seed"
        )
    result = {
        "seeds": list(config.seeds),
        "mode": config.mode,
        "samples_per_seed": config.samples,
        "rows": [row.summary() for row in rows.values()],
        "targets": checks,
        "distractor_answer_unit_kept@0.5": answer_units,
    }
    if base_units is not None:
        result["base"] = str(config.init)
        result["distractor_answer_unit_kept@0.5 (base scorer)"] = base_units
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "quality.png", title)
    print(table(rows))
    print()
    for t in checks:
        status = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = "-" if t["measured"] is None else f"{100 * t['measured']:+.1f} points"
        if t["per_seed"] is not None and len(t["per_seed"]) > 1:
            value += " (per seed " + " / ".join(f"{100 * d:+.1f}" for d in t["per_seed"]) + ")"
        if t["met"] is False and t["reachable"] is False:
            status += (
                f" (goal above the headroom, keep 1.0 minus the other method:"
                f" {100 * t['headroom']:+.1f} points)"
            )
        print(f"target {t['target']}: goal {100 * t['goal']:+.0f}, measured {value} -> {status}")
    for seed, kept in zip(config.seeds, answer_units, strict=True):
        rates = ", ".join(
            f"{name} {'-' if rate is None else f'{100 * rate:.0f}%'}" for name, rate in kept.items()
        )
        print(f"seed {seed}: distractor answer unit kept at 0.5: {rates}")
    if base_units is not None:
        rates = ", ".join(
            f"{name} {'-' if r is None else f'{100 * r:.0f}%'}" for name, r in base_units.items()
        )
        print(f"base {config.init}: distractor answer unit kept at 0.5: {rates}")
    print(f"wrote {out / 'quality.json'} and quality.png")
    return result


class Quality(TrainingKnobs):
    """Train several seeds, evaluate each on every row, aggregate (mean, seeds, pooled 95%
    interval) and check the quality targets; writes OUT/quality.json and OUT/quality.png.
    Finished seeds are reused, so a stopped run continues."""

    out: CliPositionalArg[Path]
    seeds: list[int] = Field(list(QualityConfig.seeds), description="one training run per seed")
    init: Path | None = Field(
        QualityConfig.init,
        description="start every seed from this checkpoint (default: fresh demos)",
    )
    family: Literal["qwen2_5_vl", "qwen3_vl"] = QualityConfig.family
    text_layers: int = Field(
        QualityConfig.text_layers,
        ge=1,
        description="LLM depth of the fresh demos (the serving demo has 2): time questions",
    )
    mode: Literal["scratch", "scorer", "scorer+llm"] = QualityConfig.mode
    steps: int = 1200
    samples: int = Field(QualityConfig.samples, description="eval questions per row per seed")
    ratios: list[float] = Field(list(QualityConfig.ratios), description="keep ratios to compare at")
    unit_samples: int = Field(
        QualityConfig.unit_samples,
        description="distractor clips on which to count how often the answer unit is kept",
    )

    def config(self) -> QualityConfig:
        knobs = set(TrainingKnobs.model_fields)
        study = self.model_dump(exclude=knobs)
        return QualityConfig(**study, train_fields=self.model_dump(include=knobs))

    def cli_cmd(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        run_quality(self.config())


def main(argv: list[str] | None = None) -> None:
    source = CliSettingsSource(
        Quality, cli_prog_name="python -m experiments.quality", cli_kebab_case=True
    )
    CliApp.run(Quality, cli_args=sys.argv[1:] if argv is None else argv, cli_settings_source=source)


if __name__ == "__main__":
    main()
