"""What a row measured, and the report: Wilson intervals, the text tables, `eval.json`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stts_vllm.eval.modes import Mode
from stts_vllm.eval.plots import plot_results
from stts_vllm.training.videoqa import VideoQA


@dataclass
class ModeResult:
    mode: Mode
    correct: int = 0
    total: int = 0
    video_tokens: int = 0
    wall_seconds: float = 0.0
    by_task: dict[str, list[int]] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list, repr=False)
    answer_ids: list[int] = field(default_factory=list, repr=False)  # first token (offline)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.total)

    def record(self, sample: VideoQA, answer: str, video_tokens: int) -> None:
        """Score one answer: exact match with the sample's one-word answer."""
        ok = int(answer.strip() == sample.answer)
        self.correct += ok
        self.total += 1
        self.video_tokens += video_tokens
        task = self.by_task.setdefault(sample.task, [0, 0])
        task[0] += ok
        task[1] += 1
        self.answers.append(answer.strip())

    def summary(self) -> dict[str, Any]:
        lo, hi = self.interval()
        return {
            "mode": self.mode.name,
            **asdict(self.mode),
            "accuracy": self.accuracy,
            "ci95": [lo, hi],
            "samples": self.total,
            "video_tokens_mean": self.video_tokens / max(1, self.total),
            "wall_seconds": self.wall_seconds,
            "by_task": {t: c / n for t, (c, n) in sorted(self.by_task.items())},
        }


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval: honest at small n and near 0 or 1."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def table(results: Sequence[ModeResult]) -> str:
    lines = [
        f"{'mode':34} {'accuracy':>8} {'95% CI':>15} {'video tok':>9} {'wall s':>7}",
    ]
    for r in results:
        lo, hi = r.interval()
        lines.append(
            f"{r.mode.name:34} {100 * r.accuracy:7.1f}% [{100 * lo:5.1f},{100 * hi:5.1f}] "
            f"{r.video_tokens / max(1, r.total):9.1f} {r.wall_seconds:7.1f}"
        )
    return "\n".join(lines)


def per_task_table(results: Sequence[ModeResult]) -> str:
    tasks = sorted({t for r in results for t in r.by_task})
    lines = [f"{'mode':34} " + " ".join(f"{t:>9}" for t in tasks)]
    for r in results:
        cells = []
        for t in tasks:
            c, n = r.by_task.get(t, (0, 0))
            cells.append(f"{100 * c / n:8.1f}%" if n else f"{'-':>9}")
        lines.append(f"{r.mode.name:34} " + " ".join(cells))
    return "\n".join(lines)


def write_report(results: Sequence[ModeResult], out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    report = meta | {"results": [r.summary() for r in results]}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    plot_results(results, out / "eval.png", meta.get("title", "video QA accuracy"))
    return report
