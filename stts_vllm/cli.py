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
from stts_vllm.training.config import TrainConfig
from stts_vllm.training.knobs import TrainingKnobs
from stts_vllm.training.videoqa import TRAINABLE


class MakeDemo(BaseModel):
    """Build a tiny random STTS checkpoint (offline, deterministic by seed): Qwen2.5-VL, or
    Qwen3-VL with `--family qwen3_vl`, or Qwen3.5 with `--family qwen3_5` (bfloat16 on CPU)."""

    out: CliPositionalArg[Path]
    family: Literal["qwen2_5_vl", "qwen3_vl", "qwen3_5"] = "qwen2_5_vl"
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


class Train(TrainingKnobs):
    """Train STTS on procedural video QA (transformers model, the same STTS core as vLLM).

    Without `--init` a fresh tiny demo model (learned scorer) is built under OUT/init and
    trained from scratch. The result, OUT/checkpoint, is an STTS checkpoint vLLM serves as is.
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
    mode: Literal["scratch", "scorer", "scorer+llm"] = TrainConfig.mode
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
    def _until_evals_needs_until(self) -> Train:
        # Refused before a fresh demo is built under OUT; the config checks it again.
        if self.until_evals > 1 and not self.until:
            raise ValueError(f"--until-evals {self.until_evals} needs --until (the bars to hold)")
        return self

    def config(self, init: Path) -> TrainConfig:
        fields = self.model_dump(exclude={"out", "init", "family", "text_layers"})
        return TrainConfig(init=init, out=self.out, **fields)

    def cli_cmd(self) -> None:
        import logging

        from stts_vllm.training.train import fresh_demo, train

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        init = self.init or fresh_demo(self.out / "init", self.seed, self.family, self.text_layers)
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
