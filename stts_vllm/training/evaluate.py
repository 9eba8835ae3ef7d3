"""`stts-vllm eval`: a procedural video-QA split through vLLM (offline) or through the server.

Methods compared at equal video-token budget, all on the same weights:
- `none`: keep 1.0 (the stock model; the STTS model at keep 1.0 is bit-identical to it);
- `random`: random units dropped at the STTS layer (the paper's baseline);
- `evs`: vLLM's own Efficient Video Sampling (`--video-pruning-rate`), after the ViT;
- `heuristic`: STTS with `1 - cos` scores, no weights;
- `learned`: STTS with the trained scorer.
`tts` rows spend the saved budget on more frames (test-time scaling) on the `long` split;
`distractor` rows ask where most units flicker and the answer barely changes; `per_step` rows
run the same checkpoint with the per-step quota that timestamped prompts need instead of the
paper's global top-k, so the table says what the quota costs.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stts_vllm.checkpoint import derive
from stts_vllm.offline_engine import EngineCache
from stts_vllm.training.model import chat_prompt
from stts_vllm.training.videoqa import VideoQA, make_sample, subsample
from stts_vllm.video_inputs import video_metadata as frames_metadata

METHODS = ("none", "random", "evs", "heuristic", "learned")
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


STTS_METHODS = ("heuristic", "learned")


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


@dataclass
class ModeResult:
    mode: Mode
    correct: int = 0
    total: int = 0
    video_tokens: int = 0
    wall_seconds: float = 0.0
    by_task: dict[str, list[int]] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list, repr=False)
    answer_ids: list[int] = field(default_factory=list, repr=False)  # first token (offline)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.total)

    def summary(self) -> dict[str, Any]:
        lo, hi = self.interval()
        return {
            "mode": self.mode.name,
            **asdict(self.mode),
            "accuracy": self.accuracy,
            "ci95": [lo, hi],
            "samples": self.total,
            "video_tokens_mean": self.video_tokens / max(1, self.total),
            "wall_seconds": self.wall_seconds,
            "by_task": {t: c / n for t, (c, n) in sorted(self.by_task.items())},
        }


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval: honest at small n and near 0 or 1."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def clips(mode: Mode, count: int) -> list[VideoQA]:
    return [
        subsample(make_sample(s, mode.split, mode.clip_frames), mode.frames) for s in range(count)
    ]


def video_metadata(sample: VideoQA) -> dict[str, Any]:
    """What vLLM's Qwen2.5-VL processor wants with pre-sampled frames."""
    return frames_metadata(int(sample.frames.shape[0]), sample.fps)


def _score(result: ModeResult, sample: VideoQA, answer: str, video_tokens: int) -> None:
    ok = int(answer.strip() == sample.answer)
    result.correct += ok
    result.total += 1
    result.video_tokens += video_tokens
    task = result.by_task.setdefault(sample.task, [0, 0])
    task[0] += ok
    task[1] += 1
    result.answers.append(answer.strip())


# --------------------------------------------------------------------------- offline vLLM


class OfflineRunner:
    """One in-process `vllm.LLM` at a time, per checkpoint variant; all variants are views of
    the same weights (links), made in a temporary directory."""

    def __init__(self, checkpoint: Path, engine_args: dict[str, Any] | None = None) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.checkpoint = Path(checkpoint)
        self.tmp = tempfile.TemporaryDirectory(prefix="stts-eval-")
        self.engines = EngineCache(
            {
                "dtype": "float32",
                "enforce_eager": True,
                "max_model_len": 8192,
                "limit_mm_per_prompt": {"video": 1},
                "seed": 0,
                # Whole prompts per step: stock EVS's position fix-up crashes when a prefill
                # chunk ends right after a vision-start token (IndexError in
                # evs.recompute_mrope_positions; STTS has its own fix-up), which a small token
                # or encoder budget makes likely.
                "max_num_seqs": 16,
                "max_num_batched_tokens": 16384,
            }
            | (engine_args or {})
        )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
        self.video_pad = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")

    def _variant(self, mode: Mode) -> tuple[Path, dict[str, Any]]:
        root = Path(self.tmp.name)
        if mode.method in ("none", "learned") and not mode.selection:
            return self.checkpoint, {}
        if mode.method == "evs":
            path = root / "stock"
            if not path.exists():
                derive(self.checkpoint, path, stock=True)
            return path, {"video_pruning_rate": round(1.0 - mode.keep, 6)}
        path = root / "-".join(filter(None, (mode.method, mode.selection)))
        if not path.exists():
            overrides = {"scorer": mode.method}
            if mode.selection:
                overrides["selection"] = mode.selection
            derive(self.checkpoint, path, stts=overrides)
        return path, {}

    def _engine(self, mode: Mode) -> Any:
        path, extra = self._variant(mode)
        return self.engines.get(path, **extra)

    def run(self, mode: Mode, samples: Sequence[VideoQA]) -> ModeResult:
        from vllm import SamplingParams

        llm = self._engine(mode)
        params = SamplingParams(temperature=0.0, max_tokens=1)
        kwargs = {} if mode.method in ("evs", "none") else {"stts_keep_ratio": mode.keep}
        if mode.method == "none" and read_architecture(self.checkpoint).startswith("STTS"):
            kwargs = {"stts_keep_ratio": 1.0}
        prompts = [
            {
                "prompt": chat_prompt(self.tokenizer, s.question),
                "multi_modal_data": {"video": [(s.frames, video_metadata(s))]},
                "mm_processor_kwargs": kwargs,
            }
            for s in samples
        ]
        result = ModeResult(mode)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        result.wall_seconds = time.perf_counter() - start
        for sample, out in zip(samples, outputs, strict=True):
            tokens = sum(1 for t in out.prompt_token_ids if t == self.video_pad)
            _score(result, sample, out.outputs[0].text, tokens)
            result.answer_ids.append(out.outputs[0].token_ids[0])
        return result

    def close(self) -> None:
        self.engines.close()


def read_architecture(path: Path) -> str:
    return json.loads((Path(path) / "config.json").read_text())["architectures"][0]


# --------------------------------------------------------------------------- over HTTP


class HTTPRunner:
    """The same questions through the server's `/v1/chat/completions` (frames as a list of
    PNG data URLs, one video). A server has one checkpoint, so only keep ratios vary here:
    `server@r` rows use the server's own scorer, `none` asks for keep 1.0."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300)
        self.model = model or self.client.get("/v1/models").json()["data"][0]["id"]

    @staticmethod
    def _frames(sample: VideoQA) -> list[str]:
        from PIL import Image

        urls = []
        for frame in sample.frames:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        return urls

    def run(self, mode: Mode, samples: Sequence[VideoQA]) -> ModeResult:
        if mode.method not in ("none", SERVER):
            raise ValueError(f"{mode.method} needs its own engine; use the offline runner")
        result = ModeResult(mode)
        start = time.perf_counter()
        for sample in samples:
            body = {
                "model": self.model,
                "max_tokens": 1,
                "temperature": 0,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": self._frames(sample)}},
                            {"type": "text", "text": sample.question},
                        ],
                    }
                ],
                "stts": {
                    "keep_ratio": mode.keep,
                    "fps": sample.fps,
                    "num_frames": len(sample.frames),
                    "test_time_scaling": False,
                },
            }
            response = self.client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            data = response.json()
            tokens = data["stts"]["videos"][0]["video_tokens_after"]
            _score(result, sample, data["choices"][0]["message"]["content"], tokens)
        result.wall_seconds = time.perf_counter() - start
        return result

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------- reporting


def run_modes(runner: Any, modes: Iterable[Mode], count: int) -> list[ModeResult]:
    """Modes are grouped by engine variant so each engine starts once."""
    order = {m: i for i, m in enumerate(modes)}
    results: dict[Mode, ModeResult] = {}
    engine = {"none": "learned"}  # one engine serves both (keep 1.0 per request)

    def group(m: Mode) -> tuple:
        variant = engine.get(m.method, m.method), m.selection or ""
        return (*variant, m.keep if m.method == "evs" else 0, order[m])

    grouped = sorted(order, key=group)
    for mode in tqdm(grouped, desc="eval"):
        results[mode] = runner.run(mode, clips(mode, count))
    runner.close()
    return [results[m] for m in sorted(results, key=order.__getitem__)]


def table(results: Sequence[ModeResult]) -> str:
    lines = [
        f"{'mode':34} {'accuracy':>8} {'95% CI':>15} {'video tok':>9} {'wall s':>7}",
    ]
    for r in results:
        lo, hi = r.interval()
        lines.append(
            f"{r.mode.name:34} {100 * r.accuracy:7.1f}% [{100 * lo:5.1f},{100 * hi:5.1f}] "
            f"{r.video_tokens / max(1, r.total):9.1f} {r.wall_seconds:7.1f}"
        )
    return "\n".join(lines)


def per_task_table(results: Sequence[ModeResult]) -> str:
    tasks = sorted({t for r in results for t in r.by_task})
    lines = [f"{'mode':34} " + " ".join(f"{t:>9}" for t in tasks)]
    for r in results:
        cells = []
        for t in tasks:
            c, n = r.by_task.get(t, (0, 0))
            cells.append(f"{100 * c / n:8.1f}%" if n else f"{'-':>9}")
        lines.append(f"{r.mode.name:34} " + " ".join(cells))
    return "\n".join(lines)


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


def plot(results: Sequence[ModeResult], path: Path, title: str) -> Path:
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


def write_report(results: Sequence[ModeResult], out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    report = meta | {"results": [r.summary() for r in results]}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "eval.png", meta.get("title", "video QA accuracy"))
    return report


# --------------------------------------------------------------------------- entry point


def hf_agreement(checkpoint: Path, mode: Mode, samples: Sequence[VideoQA], answer_ids: list[int]):
    """Greedy first answer tokens of the transformers training model on the same inputs as
    vLLM's (token ids: decoding rules for special tokens differ between the two)."""
    import torch

    from stts_vllm.training.model import STTSVideoQAModel
    from stts_vllm.training.train import pearson

    model = STTSVideoQAModel.from_checkpoint(checkpoint, scorer="learned")
    model.eval()
    hf: list[int] = []
    scores, targets = [], []
    for start in range(0, len(samples), 16):
        batch = [model.prepare(s) for s in samples[start : start + 16]]
        with torch.no_grad():
            out = model(batch, [mode.keep] * len(batch))
        hf += [int(logits.argmax()) for logits in out.answer_logits]
        for score, target in zip(out.scores, out.targets, strict=True):
            if score is not None and target is not None:
                scores.append(score[1:].flatten())
                targets.append(target.flatten())
    same = sum(a == b for a, b in zip(hf, answer_ids, strict=True))
    correlation = pearson(torch.cat(scores), torch.cat(targets)) if scores else None
    return {
        "mode": mode.name,
        "samples": len(hf),
        "same_answers": same,
        "score_target_correlation": correlation,
        "hf_answer_ids": hf,
    }


def server_modes(ratios: Sequence[float], long: bool) -> list[Mode]:
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


def run_eval(args: Any) -> dict[str, Any]:
    selections = args.selections
    if selections is None:
        selections = () if args.server else other_selections(Path(args.checkpoint))
    modes = [
        m
        for m in default_modes(tuple(args.ratios), tuple(selections))
        if m.method in args.methods
        and (args.long or m.split != "long")
        and (args.distractor or m.split != "distractor")
    ]
    if args.server:
        runner: Any = HTTPRunner(args.server, args.api_key)
        modes = server_modes(args.ratios, args.long)
    else:
        runner = OfflineRunner(Path(args.checkpoint))
    results = run_modes(runner, modes, args.samples)
    print(table(results))
    print()
    print(per_task_table(results))
    meta: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "via": args.server or "offline vLLM",
        "title": f"procedural video QA, {args.samples} questions per row",
    }
    if args.compare_hf:
        target = next((r for r in results if r.mode == Mode("learned", 0.5)), None)
        if target is not None:
            n = min(args.compare_hf, target.total)
            agree = hf_agreement(
                Path(args.checkpoint), target.mode, clips(target.mode, n), target.answer_ids[:n]
            )
            print(
                f"HF training model vs vLLM, {agree['mode']}: "
                f"{agree['same_answers']}/{agree['samples']} same greedy answers"
            )
            meta["hf_agreement"] = {k: v for k, v in agree.items() if k != "hf_answer_ids"}
    report = write_report(results, Path(args.out), meta)
    print(f"wrote {Path(args.out) / 'eval.json'} and eval.png")
    return report
