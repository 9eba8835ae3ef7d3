"""What the tower and training benchmarks share: waiting for the device, timing interleaved
runs, and saving the PNG next to the JSON. Only torch and matplotlib, imported when used, so
that the GPU machine (torch, no vLLM) runs them. Benchmarks run as scripts, so this folder is
on `sys.path`."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def device_sync(device: Any) -> Callable[[], None]:
    """A function that waits for `device`'s queued work (a no-op on the CPU), so that wall
    time is the work's time and not its launch's."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return lambda: None
    return lambda: torch.accelerator.synchronize(device)


def time_runs(
    runs: dict[Hashable, Callable[[], object]],
    repeats: int,
    sync: Callable[[], None],
    warmup: bool = True,
) -> dict[Hashable, list[float]]:
    """Each run's seconds over `repeats` rounds, interleaved so drift hits every run alike;
    `warmup`: one untimed round first (kernels, allocator)."""
    if warmup:
        for run in runs.values():
            run()
    sync()
    times: dict[Hashable, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


@contextmanager
def saved_figure(path: Path, dpi: int = 120, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """`plt.subplots(**subplots)` without a display; saved to `path` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
