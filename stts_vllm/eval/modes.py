"""The rows of the evaluation table and the clips each row asks about.

`tts` rows spend the saved budget on more frames (test-time scaling) on the `long` split;
`distractor` rows ask where most units flicker and the answer barely changes; `per_step` rows
run the same checkpoint with the per-step quota that timestamped prompts need instead of the
paper's global top-k, so the table says what the quota costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stts_vllm.training.videoqa import VideoQA, make_sample, subsample

STTS_METHODS = ("heuristic", "learned")
SERVER = "server"  # over HTTP: whatever scorer the server's checkpoint has


@dataclass(frozen=True)
class Mode:
    """One row of the table: a method at a keep ratio, on a split, with some frames."""

    method: str
    keep: float
    split: str = "test"
    frames: int = 16  # frames given to the model (the clip is subsampled to this)
    clip_frames: int = 16  # frames the clip is generated with
    selection: str | None = None  # STTS selection other than the checkpoint's own

    @property
    def name(self) -> str:
        label = self.method if self.method == "none" else f"{self.method}@{self.keep:g}"
        if self.selection:
            label += f"/{self.selection}"
        return f"{self.split}/{label}/{self.frames}f"


def default_modes(
    ratios: Sequence[float] = (0.5, 0.3, 0.2), selections: Sequence[str] = ("per_step",)
) -> list[Mode]:
    modes = [Mode("none", 1.0)]
    for keep in ratios:
        modes += [Mode(m, keep) for m in ("random", "evs", *STTS_METHODS)]
    # The selection the checkpoint does not use, on the same weights.
    for selection in selections:
        modes += [Mode(m, keep, selection=selection) for keep in ratios for m in STTS_METHODS]
    # Change is not the signal: the answer flashes once in a unit among flicker and blocks of
    # decoy colour, so a kept neighbour carries a mixture of colours, not the answer's.
    modes += [Mode("none", 1.0, "distractor")]
    for keep in sorted({0.5, min(ratios, default=0.5)}, reverse=True):
        modes += [Mode(m, keep, "distractor") for m in ("random", "evs", *STTS_METHODS)]
    # Test-time scaling on long clips (64 frames, one brief event): the unpruned model at 16
    # frames vs STTS at 0.5 with 2x the frames (same video-token budget), for both scorers.
    modes += [Mode("none", 1.0, "long", 16, 64)]
    for method in STTS_METHODS:
        modes += [Mode(method, 0.5, "long", 16, 64), Mode(method, 0.5, "long", 32, 64)]
    return modes


def server_modes(ratios: Sequence[float], long: bool) -> list[Mode]:
    """A server has one checkpoint, so only keep ratios vary: `server@r` rows use the
    server's own scorer, `none` asks for keep 1.0."""
    modes = [Mode("none", 1.0)] + [Mode(SERVER, keep) for keep in ratios]
    if long:
        modes += [Mode("none", 1.0, "long", 16, 64), Mode(SERVER, 0.5, "long", 32, 64)]
    return modes


def other_selections(checkpoint: Path) -> tuple[str, ...]:
    """The selection a checkpoint could run instead of its own: Qwen2.5-VL (global top-k)
    can also run the per-step quota; Qwen3-VL's timestamped prompts need the quota."""
    from stts_vllm.checkpoint import read_config
    from stts_vllm.families import family_of_config

    config = read_config(checkpoint)
    family = family_of_config(config)
    own = (config.get("stts") or {}).get("selection") or family.selection
    if not family.global_selection_ok:
        return ()
    return ("per_step",) if own == "global" else ("global",)


def clips(mode: Mode, count: int) -> list[VideoQA]:
    """The row's questions: seeds 0..count-1 of its split, subsampled to its frames."""
    return [
        subsample(make_sample(s, mode.split, mode.clip_frames), mode.frames) for s in range(count)
    ]
