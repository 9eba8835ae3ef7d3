"""The training run's settings, apart from the loop: the command lines (`knobs.TrainingKnobs`)
take their defaults from here, so they never disagree on the recipe a flagless run trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stts_vllm.training.videoqa import TASKS, TRAINABLE


@dataclass
class TrainConfig:
    init: Path
    out: Path
    mode: Literal["scratch", "scorer", "scorer+llm"] = "scratch"
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    scorer_lr: float = 1e-3
    warmup: int = 100
    aux_weight: float = 0.5
    keep_ratios: tuple[float, ...] = (1.0, 0.5, 0.3, 0.2)
    frames: tuple[int, ...] = (16, 16, 16, 8, 32)
    # The training mix: item i of a step's batch asks tasks[(first sample + i) % len]; a
    # task listed twice gets twice the questions. The default is exactly the test split's
    # cycle, so the default samples are the same with or without this field.
    tasks: tuple[str, ...] = TASKS
    # Off by default (the paper's recipe): `explore` > 0 draws the learned scorer's kept sets
    # at this temperature; `policy_weight` scales the REINFORCE term on those draws.
    explore: float = 0.0
    policy_weight: float = 0.0
    # With a policy term: which kept sets carry the answer loss's gradient, the drawn ones
    # (`draws`) or the top-k (`top_k`, the draws then only reward the scorer: its weights, and
    # in `scratch` mode the ViT blocks under it, whose output the scores read).
    answer_loss_on: Literal["draws", "top_k"] = "draws"
    # A stage that runs until it has learned: stop at the first evaluation where every task
    # named here answers at least its bar (keep 1.0, `eval_samples` val clips); `steps` is
    # then a cap, and the lr schedule still spans it. A small LLM leaves chance on a task
    # after a plateau whose length varies from seed to seed and run to run
    # (experiments/README.md, "A curriculum ..."), so a fixed step count fits one run only.
    until: dict[str, float] = field(default_factory=dict)
    # ... held at this many evaluations in a row: a plateau's first climb can cross the bar
    # once and fall back (loss still near chance), and a later stage then starts on a task
    # that is not yet learned.
    until_evals: int = 1
    eval_every: int = 250
    eval_samples: int = 100
    save_every: int = 250
    seed: int = 0
    threads: int | None = None
    # Where the model trains ("cpu", "cuda", "cuda:1"): states and checkpoints are saved
    # device-free, so a run started on one device resumes on another.
    device: str = "cpu"
    # bfloat16: mixed precision (torch.autocast); weights, optimizer and scorer stay float32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    resume: bool = False

    def __post_init__(self) -> None:
        # CLI and JSON hand these over as lists; the saved config and `_batch` want tuples.
        self.keep_ratios = tuple(self.keep_ratios)
        self.frames = tuple(self.frames)
        self.tasks = tuple(self.tasks)
        check_frames(self.frames)
        check_device(self.device)
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        unknown = sorted(set(self.tasks) - set(TRAINABLE))
        check_exploration(self.explore, self.policy_weight, self.answer_loss_on)
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be a non-empty list from {TRAINABLE}, got {unknown}")
        self.until = dict(self.until)
        unknown = sorted(set(self.until) - set(TRAINABLE))
        bars = [bar for bar in self.until.values() if not 0.0 <= bar <= 1.0]
        if unknown or bars:
            raise ValueError(
                f"until maps tasks from {TRAINABLE} to accuracies in [0, 1], got {self.until}"
            )
        if self.until_evals < 1:
            raise ValueError(f"until_evals must be at least 1, got {self.until_evals}")
        if self.until_evals > 1 and not self.until:
            # Without bars nothing is counted: the run would silently go to `steps`.
            raise ValueError(f"until_evals={self.until_evals} needs until (the bars to hold)")


def check_frames(frames: tuple[int, ...] | list[int]) -> None:
    """make_sample's own limit, refused up front (the CLI: before it builds a fresh demo)
    rather than at the first batch that draws a bad clip length."""
    if not frames or any(f < 8 or f % 2 for f in frames):
        raise ValueError(f"frames must be even numbers >= 8, got {list(frames)}")


def check_device(device: str) -> None:
    """A device name torch understands (whether this machine has it is checked when training
    starts: a config may be written on one machine and run on another)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from error
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")


def check_exploration(explore: float, policy_weight: float, answer_loss_on: str) -> None:
    """The exploration knobs that only make sense together; the CLI checks them before it
    builds or evaluates anything, the config again for callers from Python."""
    if policy_weight and explore <= 0:
        raise ValueError("policy_weight needs explore > 0: a top-k draw has no probability")
    if answer_loss_on not in ("draws", "top_k"):
        raise ValueError(f"answer_loss_on must be draws or top_k, got {answer_loss_on}")
    if answer_loss_on == "top_k" and not policy_weight:
        raise ValueError("answer_loss_on=top_k needs policy_weight: the draws train nothing")
