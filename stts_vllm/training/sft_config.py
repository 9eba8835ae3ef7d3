"""The settings of `stts-vllm train --data` (`sft_train.train_sft`), apart from the loop: the
command line takes its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stts_vllm.media.sampling import FrameSampling
from stts_vllm.training.config import check_device

SFT_MODES = ("scorer", "scorer+llm", "full", "lora")


@dataclass
class SFTConfig:
    init: Path
    out: Path
    data: tuple[Path, ...]
    video_root: Path | None = None
    skip_bad: bool = False
    # `scorer`: the base frozen (the cheap default for a converted checkpoint); `scorer+llm`:
    # the LLM too; `full`: every weight; `lora`: LoRA on the LLM's linear layers, merged into
    # the saved weights (vLLM serves them at full speed, no LoRA support needed).
    mode: Literal["scorer", "scorer+llm", "full", "lora"] = "scorer"
    steps: int = 1000
    max_tokens_per_step: int = 16384  # LLM tokens per micro-batch, after pruning
    grad_accum: int = 1
    lr: float = 1e-5
    scorer_lr: float = 1e-3
    warmup: int = 50
    aux_weight: float = 0.5
    keep_ratios: tuple[float, ...] = (1.0, 0.5, 0.3)
    fps: float = FrameSampling.fps
    min_frames: int = FrameSampling.min_frames
    max_frames: int = FrameSampling.max_frames
    # frame pixel bounds over the processor's, as `stts-serve --frame-min/max-pixels`
    frame_min_pixels: int | None = None
    frame_max_pixels: int | None = None
    workers: int = 2
    lora_rank: int = 16
    lora_alpha: int = 32
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    save_every: int = 250
    seed: int = 0
    threads: int | None = None
    resume: bool = False
    world_size: int = field(default=1, init=False)  # set from torchrun's environment

    def __post_init__(self) -> None:
        self.data = tuple(Path(p) for p in self.data)
        self.keep_ratios = tuple(self.keep_ratios)
        if not self.data:
            raise ValueError("data: give at least one file")
        if self.mode not in SFT_MODES:
            raise ValueError(f"mode must be one of {SFT_MODES} with --data, got {self.mode!r}")
        if not self.keep_ratios or not all(0 < k <= 1 for k in self.keep_ratios):
            raise ValueError(f"keep_ratios must be in (0, 1], got {list(self.keep_ratios)}")
        for name in ("steps", "max_tokens_per_step", "grad_accum", "lora_rank", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be at least 0, got {self.workers}")
        check_device(self.device)

    @property
    def sampling(self) -> FrameSampling:
        return FrameSampling(fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames)
