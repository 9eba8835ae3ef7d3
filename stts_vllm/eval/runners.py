"""The engines that answer a row's questions: offline vLLM (every method, one engine per
checkpoint variant), the server over HTTP (the server's own scorer), and the transformers
training model, whose answers the offline ones must match."""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from stts_vllm.checkpoint import derive
from stts_vllm.eval.modes import SERVER, Mode, clips
from stts_vllm.eval.report import ModeResult
from stts_vllm.offline_engine import EngineCache
from stts_vllm.training.model import chat_prompt
from stts_vllm.training.videoqa import VideoQA
from stts_vllm.video_inputs import video_metadata as frames_metadata


class Runner(Protocol):
    def run(self, mode: Mode, samples: Sequence[VideoQA]) -> ModeResult: ...

    def close(self) -> None: ...


def video_metadata(sample: VideoQA) -> dict[str, Any]:
    """What vLLM's Qwen2.5-VL processor wants with pre-sampled frames."""
    return frames_metadata(int(sample.frames.shape[0]), sample.fps)


def read_architecture(path: Path) -> str:
    return json.loads((Path(path) / "config.json").read_text())["architectures"][0]


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
            result.record(sample, out.outputs[0].text, tokens)
            result.answer_ids.append(out.outputs[0].token_ids[0])
        return result

    def close(self) -> None:
        self.engines.close()


# --------------------------------------------------------------------------- over HTTP


class HTTPRunner:
    """The same questions through the server's `/v1/chat/completions` (frames as a list of
    PNG data URLs, one video); only `none` and `server@r` rows (`modes.server_modes`)."""

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
            result.record(sample, data["choices"][0]["message"]["content"], tokens)
        result.wall_seconds = time.perf_counter() - start
        return result

    def close(self) -> None:
        self.client.close()


def run_modes(runner: Runner, modes: Iterable[Mode], count: int) -> list[ModeResult]:
    """Modes are grouped by engine variant so each engine starts once; results come back in
    the order the modes were given."""
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


# --------------------------------------------------------------------------- transformers


def hf_agreement(
    checkpoint: Path, mode: Mode, samples: Sequence[VideoQA], answer_ids: list[int]
) -> dict[str, Any]:
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
