"""The accuracy bar plots: `eval.png` here, and the same axes for the seed study's plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stts_vllm.eval.report import ModeResult

METHOD_COLORS = {"none": "#555555", "random": "#bbbbbb", "evs": "#e6a03c", "heuristic": "#6fa8dc"}
"""Bar colours of the accuracy plots; any other method (the learned scorer) is green."""


def method_color(method: str) -> str:
    return METHOD_COLORS.get(method, "#2e7d32")


def save_accuracy_plot(
    fig: Any, ax: Any, labels: Sequence[str], ylabel: str, title: str, path: Path, **ticks: Any
) -> Path:
    """The axes, title and file every accuracy bar plot shares (`eval.png`, `quality.png`)."""
    import matplotlib.pyplot as plt

    ax.set_xticks(range(len(labels)), labels, ha="right", **ticks)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_results(results: Sequence[ModeResult], path: Path, title: str) -> Path:
    """One bar per row with its 95% interval, and its mean video tokens written in the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.mode.name.replace("/", "\n", 1) for r in results]
    acc = [100 * r.accuracy for r in results]
    lo = [100 * (r.accuracy - r.interval()[0]) for r in results]
    hi = [100 * (r.interval()[1] - r.accuracy) for r in results]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(results)), 4.5))
    bars = ax.bar(
        range(len(results)),
        acc,
        yerr=[lo, hi],
        capsize=3,
        color=[method_color(r.mode.method) for r in results],
    )
    for bar, r in zip(bars, results, strict=True):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            2,
            f"{r.video_tokens / max(1, r.total):.0f} tok",
            ha="center",
            fontsize=7,
            rotation=90,
            color="white",
        )
    return save_accuracy_plot(
        fig, ax, names, "accuracy (%) with 95% CI", title, path, rotation=60, fontsize=7
    )
