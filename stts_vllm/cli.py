"""`stts-vllm`: build the demo checkpoint, convert a stock one, serve the demo, train, eval.

Flags and `STTS_*` environment variables both work (pydantic-settings), e.g.
`stts-vllm make-demo artifacts/demo --keep-ratio 0.5` or `STTS_PORT=9000 stts-vllm serve-demo D`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliPositionalArg,
    CliSubCommand,
    SettingsConfigDict,
)

from stts_vllm.eval.config import EvalConfig
from stts_vllm.families import DEMO_FAMILIES
from stts_vllm.training.config import TrainConfig
from stts_vllm.training.knobs import TrainingKnobs
from stts_vllm.training.sft_config import SFTConfig
from stts_vllm.training.videoqa import TRAINABLE


class MakeDemo(BaseModel):
    """Build a tiny random STTS checkpoint (offline, deterministic by seed) of a family that
    has a demo (`--family`, default Qwen2.5-VL; Qwen3.5's is bfloat16, also on the CPU)."""

    out: CliPositionalArg[Path]
    family: Literal[*DEMO_FAMILIES] = "qwen2_5_vl"  # type: ignore[valid-type]
    seed: int = 0
    keep_ratio: float = 0.5
    prune_at: int = 1
    scorer: Literal["heuristic", "learned"] = "heuristic"
    vit_depth: int = 4

    def cli_cmd(self) -> None:
        from stts_vllm.demo import make_demo

        path = make_demo(
            self.out,
            family=self.family,
            seed=self.seed,
            keep_ratio=self.keep_ratio,
            prune_at=self.prune_at,
            scorer=self.scorer,
            vit_depth=self.vit_depth,
            overwrite=True,
        )
        print(f"demo checkpoint: {path}")


class Convert(BaseModel):
    """Turn a stock Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE or Qwen3.5 directory into an STTS one
    (the family is read from its config.json; weights linked, not copied)."""

    src: CliPositionalArg[Path]
    out: CliPositionalArg[Path]
    keep_ratio: float = 0.5
    prune_at: int = 3
    scorer_weights: Path | None = Field(None, description="safetensors of a trained scorer")
    overwrite: bool = False

    def cli_cmd(self) -> None:
        from stts_vllm.checkpoint import convert

        path = convert(
            self.src,
            self.out,
            keep_ratio=self.keep_ratio,
            prune_at=self.prune_at,
            scorer_weights=self.scorer_weights,
            overwrite=self.overwrite,
        )
        print(f"STTS checkpoint: {path}")


class ServeDemo(BaseModel):
    """Serve a checkpoint with vLLM's own OpenAI server, CPU-friendly settings."""

    model: CliPositionalArg[Path]
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int = 16384
    trust_request_mm_kwargs: bool = Field(
        True, description="let clients send mm_processor_kwargs (the per-request stts_keep_ratio)"
    )

    def cli_cmd(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            "stts-demo",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            str(self.max_model_len),
            "--limit-mm-per-prompt",
            '{"image": 4, "video": 2}',
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.trust_request_mm_kwargs:
            argv.append("--trust-request-mm-kwargs")
        os.execv(sys.executable, argv)


# Flags of the procedural trainer only, and of `--data` only: each refused with the other.
_PROCEDURAL_ONLY = {
    "batch_size", "frames", "explore", "policy_weight", "answer_loss_on", "tasks", "until",
    "until_evals", "eval_every", "eval_samples", "family", "text_layers",
}  # fmt: skip
_DATA_ONLY = {
    "video_root", "skip_bad", "max_tokens_per_step", "grad_accum", "gradient_checkpointing",
    "workers", "fps", "min_frames", "max_frames", "frame_min_pixels", "frame_max_pixels",
    "lora_rank", "lora_alpha",
}  # fmt: skip


class Train(TrainingKnobs):
    """Train STTS: on your own videos (`--data`, a real checkpoint as `--init`), or on the
    procedural video QA the project generates (transformers model, the same STTS core as vLLM).

    With `--data FILE` (LLaVA/Qwen-VL JSON or JSONL, or OpenAI chat records) the conversations
    are decoded as the server decodes them and trained on in `--mode scorer` (default),
    `scorer+llm`, `full` or `lora`; `torchrun --nproc-per-node N -m stts_vllm.cli train ...`
    runs it data-parallel. Without `--data` and `--init`, a fresh tiny demo model is built
    under OUT/init and trained from scratch on the procedural QA. The result, OUT/checkpoint,
    is an STTS checkpoint vLLM serves as is.
    """

    out: CliPositionalArg[Path]
    init: Path | None = Field(
        None, description="checkpoint to start from, Qwen2.5-VL or Qwen3-VL (default: fresh demo)"
    )
    family: Literal["qwen2_5_vl", "qwen3_vl"] = Field(
        "qwen2_5_vl", description="the fresh demo's family when no --init is given"
    )
    text_layers: int | None = Field(
        None, ge=1, description="the fresh demo's LLM depth (default: the serving demo's)"
    )
    mode: Literal["scratch", "scorer", "scorer+llm", "full", "lora"] = Field(
        TrainConfig.mode,
        description="what trains: the scorer only (the base frozen), scorer+llm, every weight "
        "(full; scratch is its name for the procedural demo), or LoRA adapters on the LLM "
        "(lora, merged into the saved weights); default: scratch, or scorer with --data",
    )
    data: list[Path] = Field(
        [],
        description="training records: LLaVA/Qwen-VL JSON or JSONL, or OpenAI chat messages "
        "(repeat for several files); without it, the procedural video QA",
    )
    video_root: Path | None = Field(None, description="where --data's relative paths are")
    skip_bad: bool = Field(False, description="skip and count bad records instead of stopping")
    max_tokens_per_step: int = Field(
        SFTConfig.max_tokens_per_step, ge=1, description="LLM tokens per micro-batch (--data)"
    )
    grad_accum: int = Field(SFTConfig.grad_accum, ge=1, description="micro-batches per step")
    gradient_checkpointing: bool = Field(False, description="recompute the LLM's activations")
    workers: int = Field(SFTConfig.workers, ge=0, description="DataLoader decoding processes")
    fps: float = Field(
        SFTConfig.fps, gt=0, description="frames per second sampled (as --fps of stts-serve)"
    )
    min_frames: int = Field(SFTConfig.min_frames, ge=1)
    max_frames: int = Field(SFTConfig.max_frames, ge=1)
    frame_min_pixels: int | None = Field(None, ge=1, description="as stts-serve's (--data)")
    frame_max_pixels: int | None = Field(None, ge=1, description="as stts-serve's (--data)")
    lora_rank: int = Field(SFTConfig.lora_rank, ge=1)
    lora_alpha: int = Field(SFTConfig.lora_alpha, ge=1)
    until: dict[Literal[*TRAINABLE], float] = Field(  # type: ignore[valid-type]
        {},
        description="stop at the first evaluation where each named task's keep-1.0 val "
        "accuracy reaches its value, e.g. changed=0.85 (--steps is then a cap): a stage that "
        "runs until its task is learned, however long the plateau before it lasts",
    )
    until_evals: int = Field(
        TrainConfig.until_evals,
        ge=1,
        description="--until's bars must hold at this many evaluations in a row",
    )
    eval_every: int = TrainConfig.eval_every
    eval_samples: int = TrainConfig.eval_samples
    save_every: int = TrainConfig.save_every
    seed: int = TrainConfig.seed
    threads: int | None = Field(
        TrainConfig.threads,
        ge=1,
        description="torch's CPU threads (default: torch's, every core); several runs on one "
        "machine, GPU runs too, each take all of them unless split",
    )
    resume: bool = Field(False, description="continue from OUT/last if it exists")

    @model_validator(mode="after")
    def _flags_fit_the_data(self) -> Train:
        given = self.model_fields_set

        def flags(names: set[str]) -> str:
            return ", ".join("--" + name.replace("_", "-") for name in sorted(names))

        if self.data:
            if given & _PROCEDURAL_ONLY:
                raise ValueError(
                    f"{flags(given & _PROCEDURAL_ONLY)}: the procedural video QA's, not --data's"
                )
            if "mode" in given and self.mode == "scratch":
                raise ValueError("--mode scratch is the procedural demo's; with --data: full")
            if self.init is None:
                raise ValueError("--data needs --init: the checkpoint to fine-tune")
        else:
            if given & _DATA_ONLY:
                raise ValueError(f"{flags(given & _DATA_ONLY)} need --data")
            if self.mode in ("full", "lora"):
                raise ValueError(f"--mode {self.mode} needs --data (the procedural demo: scratch)")
        return self

    @model_validator(mode="after")
    def _until_evals_needs_until(self) -> Train:
        # Refused before a fresh demo is built under OUT; the config checks it again.
        if self.until_evals > 1 and not self.until:
            raise ValueError(f"--until-evals {self.until_evals} needs --until (the bars to hold)")
        return self

    def config(self, init: Path) -> TrainConfig:
        exclude = {"out", "init", "family", "text_layers", "data", *_DATA_ONLY}
        return TrainConfig(init=init, out=self.out, **self.model_dump(exclude=exclude))

    def sft_config(self) -> SFTConfig:
        """`--data`'s run: the flags given, the fine-tuning defaults for the rest (its lr is a
        real checkpoint's, not a fresh demo's)."""
        shared = {
            "steps", "lr", "scorer_lr", "warmup", "aux_weight", "keep_ratios", "device",
            "dtype", "save_every", "seed", "threads", "resume", "mode",
        }  # fmt: skip
        given = self.model_fields_set & (shared | _DATA_ONLY)
        if "mode" not in given:
            given = given | {"mode"}
            mode = {"mode": "scorer"}
        else:
            mode = {}
        fields = {name: getattr(self, name) for name in given} | mode
        assert self.init is not None
        return SFTConfig(init=self.init, out=self.out, data=tuple(self.data), **fields)

    def cli_cmd(self) -> None:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        if self.data:
            from stts_vllm.training.sft_train import train_sft

            path = train_sft(self.sft_config())
        else:
            from stts_vllm.training.train import fresh_demo, train

            init = self.init or fresh_demo(
                self.out / "init", self.seed, self.family, self.text_layers
            )
            path = train(self.config(init))
        print(f"trained STTS checkpoint: {path}")


class Eval(BaseModel):
    """Accuracy, video tokens and time of none / random / EVS / STTS heuristic / STTS learned
    on a procedural video-QA split; prints a table, writes OUT/eval.json and OUT/eval.png."""

    checkpoint: CliPositionalArg[Path]
    out: Path = EvalConfig.out
    samples: int = Field(EvalConfig.samples, description="questions per row")
    ratios: list[float] = Field(list(EvalConfig.ratios), description="keep ratios to compare at")
    methods: list[str] = Field(list(EvalConfig.methods), description="rows to run")
    long: bool = Field(EvalConfig.long, description="also the long-video test-time scaling rows")
    distractor: bool = Field(EvalConfig.distractor, description="also the distractor-split rows")
    selections: list[str] | None = Field(
        EvalConfig.selections,
        description="STTS selections to run besides the checkpoint's own "
        "(default: the other one where the family allows it; [] for none)",
    )
    server: str | None = Field(
        EvalConfig.server, description="evaluate through this server's HTTP API"
    )
    api_key: str | None = EvalConfig.api_key
    compare_hf: int = Field(
        EvalConfig.compare_hf, description="also check N answers against the HF model"
    )

    @model_validator(mode="after")
    def _config_is_valid(self) -> Eval:
        self.config()  # refused here, before an engine starts
        return self

    def config(self) -> EvalConfig:
        return EvalConfig(**self.model_dump())

    def cli_cmd(self) -> None:
        from stts_vllm.eval.run import run_eval

        run_eval(self.config())


class Main(BaseSettings):
    """STTS video token pruning for vLLM."""

    model_config = SettingsConfigDict(env_prefix="STTS_", cli_kebab_case=True)

    make_demo: CliSubCommand[MakeDemo]
    convert: CliSubCommand[Convert]
    serve_demo: CliSubCommand[ServeDemo]
    train: CliSubCommand[Train]
    eval: CliSubCommand[Eval]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main(argv: list[str] | None = None) -> None:
    CliApp.run(Main, cli_args=sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
