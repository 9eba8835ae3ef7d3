"""lmms-eval, the harness video VLMs are judged with, run unchanged against a live `stts-serve`
in every way it sends a video: its default mode (the client decodes and sends each frame as an
`image_url` part), `pass_video_url` (a `file://` URL plus `media_io_kwargs.video.num_frames`)
and its Qwen3-VL message format (a `<t seconds>` text part before each frame). Every request
must be answered, and pruned.

The real client, in its own venv (`scripts/install_lmms_eval.sh`, which `make test` runs), on a
local task this module writes: a few mp4 clips, a JSONL and a task YAML (`--include_path`).
Its requests pass through a recording proxy, so the test can read what lmms-eval sent and what
the server answered; the pruning figures come from the server's own metrics."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from media import encode_video, moving_square_video

from tests.processes import free_port
from tests.server.helpers import API_KEY, SUMMARY, Server, metric_values

ROOT = Path(__file__).resolve().parents[2]
LMMS_EVAL = Path(os.environ.get("LMMS_EVAL_VENV", ROOT / ".venv-lmms-eval")) / "bin" / "lmms-eval"
CLIPS = 4
FAILED = "[LMMS_EVAL_REQUEST_FAILED"  # what lmms-eval writes as a failed sample's answer
BEFORE, AFTER = "stts_video_tokens_before_pruning_total", "stts_video_tokens_after_pruning_total"
CHAT_200 = 'stts_requests_total{route="/v1/chat/completions",status="200"}'

# mode -> (lmms-eval model, its model_args beyond the server's address)
MODES = {
    "frames": ("openai", ""),  # the default: 10 frames per clip, as base64 PNG image parts
    "video_url": ("openai", "pass_video_url=True,max_frames_num=8"),
    "qwen3_vl": ("async_openai", "is_qwen3_vl=True,nframes=8"),
}

TASK_YAML = """\
task: stts_smoke
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: answered
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = """\
import os

CLIPS = {clips!r}


def doc_to_visual(doc):
    return [os.path.join(CLIPS, doc["video"])]


def process_results(doc, results):
    return {{"answered": float(not results[0].startswith({failed!r}))}}
"""


@dataclass
class RecordingProxy:
    """Forwards chat completions to `target` unchanged, keeping each body and status."""

    target: str
    exchanges: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    url: str = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def forward(request: Request) -> Response:
            body = await request.body()
            headers = {k: request.headers[k] for k in ("authorization", "content-type")}
            async with httpx.AsyncClient(timeout=300) as client:
                reply = await client.post(
                    f"{self.target}/v1/chat/completions", content=body, headers=headers
                )
            self.exchanges.append((json.loads(body), reply.status_code))
            return Response(reply.content, reply.status_code, media_type="application/json")

        return app


@pytest.fixture(scope="module")
def lmms_eval() -> Path:
    if not LMMS_EVAL.exists():
        pytest.fail(f"{LMMS_EVAL} is missing: run `bash scripts/install_lmms_eval.sh`")
    return LMMS_EVAL


@pytest.fixture
def proxy(request: pytest.FixtureRequest) -> Iterator[tuple[RecordingProxy, Server]]:
    """The server under test (by the case's family) behind a recording proxy."""
    family = request.node.callspec.params["family"]
    server: Server = request.getfixturevalue("server" if family == "qwen2_5_vl" else "qwen3_server")
    recorder = RecordingProxy(server.url)
    port = free_port()
    config = uvicorn.Config(recorder.app(), port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    recorder.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield recorder, server
    uv.should_exit = True
    thread.join(timeout=10)


def _write_task(root: Path, clips: Path) -> Path:
    """Four 4 s clips (16 frames at 4 fps, a square moving on a texture) and the task."""
    clips.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(CLIPS):
        name = f"clip{i}.mp4"
        (clips / name).write_bytes(encode_video(moving_square_video(16, 112, 144, seed=i), fps=4))
        rows.append({"id": i, "video": name, "question": "Where does it go?", "answer": "A"})
    task = root / "task"
    task.mkdir(parents=True, exist_ok=True)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (task / "stts_smoke.yaml").write_text(TASK_YAML.format(data=data))
    (task / "utils.py").write_text(TASK_UTILS.format(clips=str(clips), failed=FAILED))
    return task


def _run_lmms_eval(lmms_eval: Path, model: str, args: str, task: Path, out: Path) -> float:
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(out / "hf"),  # its dataset cache, not the user's
    }
    argv = [str(lmms_eval), "eval", "--model", model, "--model_args", args, "--tasks"]
    argv += ["stts_smoke", "--include_path", str(task), "--output_path", str(out)]
    argv += ["--log_samples", "--verbosity", "WARNING"]
    start = time.monotonic()
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return seconds


def _samples(out: Path) -> list[dict[str, Any]]:
    (path,) = out.rglob("*_samples_stts_smoke.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _client_times(body: dict[str, Any]) -> list[float]:
    """The `<t seconds>` text part before each frame image, in order."""
    parts = body["messages"][0]["content"]
    times = []
    for text, image in itertools.pairwise(parts):
        if text["type"] == "text" and image["type"] == "image_url":
            (t,) = re.fullmatch(r"<(\d+(?:\.\d+)?) seconds>", text["text"]).groups()
            times.append(float(t))
    return times


def _assert_prompt_times(server: Server, checkpoint: Path, body: dict[str, Any]) -> None:
    """The recorded request again, asking for its prompt's tokens: one timestamp per temporal
    step of two frames, the mean of their client times, as Qwen3-VL's processor prints it."""
    from transformers import AutoTokenizer

    times = _client_times(body)
    assert len(times) == 8, body["messages"][0]["content"][:4]
    replay = body | {"max_tokens": 1, "return_token_ids": True}
    with server.client() as client:
        reply = client.post("/v1/chat/completions", json=replay, timeout=300)
    assert reply.status_code == 200, reply.text
    (video,) = reply.json()["stts"]["videos"]
    assert video["frames_collapsed"] == len(times)
    assert video["video_tokens_after"] < video["video_tokens_before"]
    prompt = AutoTokenizer.from_pretrained(checkpoint).decode(reply.json()["prompt_token_ids"])
    stamps = re.findall(r"<(\d+\.\d) seconds><\|vision_start\|>", prompt)
    steps = [(a + b) / 2 for a, b in zip(times[::2], times[1::2], strict=True)]
    assert stamps == [f"{t:.1f}" for t in steps], (stamps, times)
    assert len(set(stamps)) == len(stamps) > 1  # the clip's real times, not one frame's


@pytest.mark.parametrize(
    ("family", "mode"),
    [
        ("qwen2_5_vl", "frames"),
        ("qwen2_5_vl", "video_url"),
        ("qwen3_vl", "frames"),
        ("qwen3_vl", "video_url"),
        ("qwen3_vl", "qwen3_vl"),
    ],
)
def test_lmms_eval_is_answered_and_pruned(
    family: str,
    mode: str,
    lmms_eval: Path,
    proxy: tuple[RecordingProxy, Server],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    recorder, server = proxy
    task = _write_task(tmp_path, server.media_root / f"lmms-{family}-{mode}")
    model, mode_args = MODES[mode]
    args = f"model=stts-demo,base_url={recorder.url}/v1,api_key={API_KEY},timeout=300,"
    args += f"max_retries=1,{mode_args}".rstrip(",")
    metrics = metric_values(server)

    seconds = _run_lmms_eval(lmms_eval, model, args, task, tmp_path / "out")

    samples = _samples(tmp_path / "out")
    assert len(samples) == CLIPS
    answers = [json.dumps(s.get("resps", s["filtered_resps"])) for s in samples]
    assert not any(FAILED in a for a in answers), answers
    assert all(s["answered"] == 1.0 for s in samples)
    assert [status for _, status in recorder.exchanges] == [200] * CLIPS
    after = metric_values(server)
    assert after[CHAT_200] - metrics[CHAT_200] == CLIPS
    before_tokens = after[BEFORE] - metrics[BEFORE]
    after_tokens = after[AFTER] - metrics[AFTER]
    assert 0 < after_tokens < before_tokens, (before_tokens, after_tokens)

    body = recorder.exchanges[0][0]
    parts = body["messages"][0]["content"]
    kinds = [p["type"] for p in parts]
    if mode == "video_url":
        assert kinds.count("video_url") == 1 and parts[0]["video_url"]["url"].startswith("file://")
        assert body["media_io_kwargs"] == {"video": {"num_frames": 8}}
    else:  # the client decoded the clip: one image part per frame
        assert kinds.count("image_url") == (10 if mode == "frames" else 8)
    if mode == "qwen3_vl":
        _assert_prompt_times(server, request.getfixturevalue("qwen3_checkpoint"), body)
    request.config.stash[SUMMARY].append(
        f"lmms-eval {mode} on {family}: {CLIPS} requests answered in {seconds:.1f} s "
        f"(video tokens {before_tokens:.0f} -> {after_tokens:.0f})"
    )
