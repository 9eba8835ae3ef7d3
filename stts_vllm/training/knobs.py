"""The optimisation settings every command-line front end of training shares (`stts-vllm
train`, `python -m experiments.quality`), as one pydantic model: a flag is added once, and
each takes its default from `TrainConfig`, so the front ends and the trainer never disagree
on the recipe a flagless run trains."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from stts_vllm.training.config import TrainConfig, check_device, check_exploration, check_frames
from stts_vllm.training.videoqa import TRAINABLE


class TrainingKnobs(BaseModel):
    """Fields of `TrainConfig`, with its defaults; checked before a front end builds
    anything (a fresh demo, an output directory)."""

    steps: int = TrainConfig.steps
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    scorer_lr: float = TrainConfig.scorer_lr
    aux_weight: float = TrainConfig.aux_weight
    warmup: int = TrainConfig.warmup
    keep_ratios: list[float] = Field(
        list(TrainConfig.keep_ratios),
        description="each training item's keep ratio is drawn from these; only items below "
        "1.0 pass the answer's gradient to the scorer",
    )
    frames: list[int] = Field(
        list(TrainConfig.frames),
        min_length=1,
        description="frames per training clip (even, at least 8), drawn per step from these; "
        "list one twice to draw it twice as often",
    )
    explore: float = Field(
        TrainConfig.explore,
        ge=0,
        description="> 0: draw the learned scorer's kept sets at this temperature (Gumbel "
        "top-k) instead of the top-k; not the paper's recipe",
    )
    policy_weight: float = Field(
        TrainConfig.policy_weight,
        ge=0,
        description="weight of the REINFORCE term on the explored draws (needs --explore)",
    )
    answer_loss_on: Literal["draws", "top_k"] = Field(
        TrainConfig.answer_loss_on,
        description="with --policy-weight: the kept sets whose answer loss trains the model, "
        "the drawn ones or the top-k (the draws then only reward the scorer)",
    )
    tasks: list[Literal[*TRAINABLE]] = Field(  # type: ignore[valid-type]
        list(TrainConfig.tasks),
        min_length=1,
        description="the training mix: the batch cycles through these tasks; list one twice "
        "to give it twice the questions (a curriculum of a few tasks, for instance)",
    )

    device: str = Field(
        TrainConfig.device,
        description="where training runs: cpu, cuda or cuda:N (states and checkpoints are "
        "saved device-free: a run resumes on another device)",
    )

    dtype: Literal["float32", "bfloat16"] = Field(
        TrainConfig.dtype,
        description="bfloat16: mixed precision (autocast; weights, optimizer and scorer stay "
        "float32), what a GPU trains a real checkpoint in; on CUDA the pruned windows then "
        "run as one FlashAttention varlen call",
    )

    @model_validator(mode="after")
    def _device_is_known(self) -> TrainingKnobs:
        check_device(self.device)
        return self

    @model_validator(mode="after")
    def _exploration_knobs_agree(self) -> TrainingKnobs:
        check_exploration(self.explore, self.policy_weight, self.answer_loss_on)
        return self

    @model_validator(mode="after")
    def _frames_are_clip_lengths(self) -> TrainingKnobs:
        check_frames(self.frames)
        return self
