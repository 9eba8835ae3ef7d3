"""What one evaluation runs: `stts-vllm eval` builds this from its flags, `experiments.quality`
from its own, and both take its defaults, so a flagless run is the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stts_vllm.core.config import SELECTIONS

METHODS: tuple[str, ...] = ("none", "random", "evs", "heuristic", "learned")
"""`none`: keep 1.0 (the stock model; the STTS model at keep 1.0 is bit-identical to it);
`random`: random units dropped at the STTS layer (the paper's baseline); `evs`: vLLM's own
Efficient Video Sampling (`--video-pruning-rate`), after the ViT; `heuristic`: STTS with
`1 - cos` scores, no weights; `learned`: STTS with the trained scorer."""


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: Path
    out: Path = Path("artifacts/eval")
    samples: int = 200  # questions per row
    ratios: tuple[float, ...] = (0.5, 0.3, 0.2)  # keep ratios to compare at
    methods: tuple[str, ...] = METHODS  # rows to run (offline; a server runs its own)
    long: bool = True  # also the long-video test-time scaling rows
    distractor: bool = True  # also the distractor-split rows
    # STTS selections to run besides the checkpoint's own; None: the other one where the
    # family allows it, () for none.
    selections: tuple[str, ...] | None = None
    server: str | None = None  # evaluate through this server's HTTP API instead of offline
    api_key: str | None = None
    compare_hf: int = 0  # also check this many answers against the transformers model

    def __post_init__(self) -> None:
        # Callers (the CLI, JSON) hand lists and strings over; the rows are built from tuples.
        set_ = object.__setattr__
        set_(self, "checkpoint", Path(self.checkpoint))
        set_(self, "out", Path(self.out))
        set_(self, "ratios", tuple(self.ratios))
        set_(self, "methods", tuple(self.methods))
        if self.selections is not None:
            set_(self, "selections", tuple(self.selections))
        # A typo in a method or selection would silently drop its rows from the table.
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods must be from {METHODS}, got {unknown}")
        unknown = sorted(set(self.selections or ()) - set(SELECTIONS))
        if unknown:
            raise ValueError(f"selections must be from {SELECTIONS}, got {unknown}")
        bad = [r for r in self.ratios if not 0.0 < r <= 1.0]
        if bad:
            raise ValueError(f"ratios must be keep ratios in (0, 1], got {list(self.ratios)}")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if self.compare_hf < 0:
            raise ValueError(f"compare_hf must be 0 or more, got {self.compare_hf}")
