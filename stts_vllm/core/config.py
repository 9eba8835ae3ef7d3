"""The `stts` block of a checkpoint's config.json, validated once at load time."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

ScorerKind = Literal["learned", "heuristic", "random"]
SCORER_KINDS: tuple[str, ...] = ("learned", "heuristic", "random")
"""`random` is the paper's baseline: same place, same count, no scores and no key bias."""
Selection = Literal["global", "per_step"]
SELECTIONS: tuple[str, ...] = ("global", "per_step")
"""`global`: the paper's top-k over the whole video. `per_step`: a fixed quota per temporal
step (first whole, the rest an equal share), ranked within the step: what prompts that put a
timestamp before each step need (Qwen3-VL), since counts are fixed before the ViT runs."""


class STTSConfigError(ValueError):
    """A bad `stts` setting; the message always names the field."""


def check_keep_ratio(value: Any, field: str = "stts.keep_ratio") -> float:
    """Keep ratios come from configs and from requests alike; both get the same message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise STTSConfigError(f"{field} must be a number in (0, 1], got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise STTSConfigError(f"{field} must be in (0, 1], got {value}")
    return value


@dataclass(frozen=True)
class STTSConfig:
    """Where and how hard to prune.

    `prune_at` is the ViT block whose output the scorer reads; block `prune_at + 1` runs with
    the log-score key bias, and every block after it sees only the kept units.
    """

    keep_ratio: float = 0.5
    prune_at: int = 3
    scorer: ScorerKind = "heuristic"
    bias_floor: float = -2.0
    scorer_hidden_size: int | None = None
    selection: Selection | None = None  # None: the model family's default

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        if isinstance(self.prune_at, bool) or not isinstance(self.prune_at, int):
            raise STTSConfigError(f"stts.prune_at must be an integer, got {self.prune_at!r}")
        if self.prune_at < 0:
            raise STTSConfigError(f"stts.prune_at must be >= 0, got {self.prune_at}")
        if self.scorer not in SCORER_KINDS:
            raise STTSConfigError(f"stts.scorer must be one of {SCORER_KINDS}, got {self.scorer!r}")
        if not (isinstance(self.bias_floor, (int, float)) and self.bias_floor < 0):
            raise STTSConfigError(
                f"stts.bias_floor must be a negative number, got {self.bias_floor!r}"
            )
        if self.scorer_hidden_size is not None and (
            not isinstance(self.scorer_hidden_size, int) or self.scorer_hidden_size <= 0
        ):
            raise STTSConfigError(
                f"stts.scorer_hidden_size must be a positive integer, got "
                f"{self.scorer_hidden_size!r}"
            )

        if self.selection is not None and self.selection not in SELECTIONS:
            raise STTSConfigError(
                f"stts.selection must be one of {SELECTIONS}, got {self.selection!r}"
            )

    def check_vit_depth(self, depth: int) -> None:
        """The biased block `prune_at + 1` must exist, so `prune_at <= depth - 2`."""
        if self.prune_at > depth - 2:
            raise STTSConfigError(
                f"stts.prune_at must be in [0, {depth - 2}] for a ViT of depth {depth} "
                f"(block prune_at + 1 carries the key bias), got {self.prune_at}"
            )

    @classmethod
    def from_dict(cls, raw: Any) -> STTSConfig:
        if not isinstance(raw, dict):
            raise STTSConfigError(f"stts must be an object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise STTSConfigError(f"stts has unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        """As stored in `config.json`; an unset `selection` (the family's default) is left out."""
        out = asdict(self)
        if out["selection"] is None:
            del out["selection"]
        return out
