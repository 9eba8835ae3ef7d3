"""A server of its own (it is stopped here), with two API keys: uploaded files private to each
key, the whole-request deadline, and the drain on SIGTERM (in-flight streams finish, new
requests are refused, the process exits cleanly)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from media import encode_mp4, moving_square_video

from stts_vllm.demo import make_demo
from tests.processes import free_port, server_env, server_process

DEADLINE_SECONDS = 6
DRAIN_SECONDS = 30
ALICE, BOB = "alice-key", "bob-key"
AUTH = {"Authorization": f"Bearer {ALICE}"}


@pytest.fixture(scope="module")
def lifecycle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Path]]:
    root = tmp_path_factory.mktemp("lifecycle")
    model = make_demo(root / "model")
    port = free_port()
    env = server_env(
        STTS_FILES_DIR=str(root / "files"),
        STTS_REQUEST_TIMEOUT_SECONDS=str(DEADLINE_SECONDS),
        STTS_DRAIN_SECONDS=str(DRAIN_SECONDS),
        STTS_API_KEYS=json.dumps([ALICE, BOB]),
    )
    argv = [sys.executable, "-m", "server.cli", "--model", str(model), "--port", str(port)]
    argv += ["--max-model-len", "8192"]
    url = f"http://127.0.0.1:{port}"
    with server_process(argv, url, "/ready", root / "server.log", env) as process:
        yield url, process, root / "server.log"


def _body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    } | extra


def _tokens_per_second(url: str) -> float:
    start = time.monotonic()
    reply = httpx.post(f"{url}/v1/chat/completions", json=_body(64), headers=AUTH, timeout=120)
    assert reply.status_code == 200, reply.text
    return 64 / (time.monotonic() - start)


def test_requests_past_the_deadline_get_504(lifecycle_server: tuple[str, Any, Path]) -> None:
    url, _, _ = lifecycle_server
    tokens = int(_tokens_per_second(url) * DEADLINE_SECONDS * 4)  # ~4 deadlines' worth
    start = time.monotonic()
    reply = httpx.post(
        f"{url}/v1/chat/completions", json=_body(min(tokens, 7000)), headers=AUTH, timeout=120
    )
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - start < DEADLINE_SECONDS + 3
    events = []
    body = _body(min(tokens, 7000), stream=True)
    chat = f"{url}/v1/chat/completions"
    with httpx.stream("POST", chat, json=body, headers=AUTH, timeout=120) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["error"]["code"] == "deadline_exceeded"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'stts_requests_total{route="/v1/chat/completions",status="504"} 2.0' in metrics


def _video_question(file_id: str) -> dict[str, Any]:
    content = [{"type": "video_url", "video_url": {"url": file_id}}, {"type": "text", "text": "?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


def test_uploaded_files_are_private_to_their_key(
    lifecycle_server: tuple[str, Any, Path],
) -> None:
    url, _, _ = lifecycle_server
    clip = encode_mp4(moving_square_video(8, 112, 112, seed=9), fps=4)
    alice = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=120)
    bob = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {BOB}"}, timeout=120)
    with alice, bob:
        upload = {"file": ("a.mp4", clip, "video/mp4")}
        file_id = alice.post("/v1/files", files=upload, data={"purpose": "vision"}).json()["id"]
        assert [f["id"] for f in alice.get("/v1/files").json()["data"]] == [file_id]
        assert bob.get("/v1/files").json()["data"] == []
        assert bob.get(f"/v1/files/{file_id}").status_code == 404
        assert bob.delete(f"/v1/files/{file_id}").status_code == 404
        assert bob.post("/v1/chat/completions", json=_video_question(file_id)).status_code == 404
        assert alice.post("/v1/chat/completions", json=_video_question(file_id)).status_code == 200
        # the same bytes uploaded by both: one copy on disk, each key deletes only its own
        assert bob.post("/v1/files", files=upload, data={"purpose": "v"}).json()["id"] == file_id
        assert alice.delete(f"/v1/files/{file_id}").status_code == 200
        assert bob.post("/v1/chat/completions", json=_video_question(file_id)).status_code == 200
        assert alice.get(f"/v1/files/{file_id}").status_code == 404


def test_sigterm_drains(lifecycle_server: tuple[str, Any, Path]) -> None:
    """SIGTERM while a stream runs: the stream completes, a request arriving meanwhile is
    refused (503 or no connection), and the process exits before the drain time is up."""
    url, process, log = lifecycle_server
    tokens = max(8, int(_tokens_per_second(url) * 3))  # a ~3 s stream
    result: dict[str, Any] = {}

    def stream() -> None:
        body = _body(tokens, stream=True, stream_options={"include_usage": True})
        chat = f"{url}/v1/chat/completions"
        with httpx.stream("POST", chat, json=body, headers=AUTH, timeout=60) as r:
            result["status"] = r.status_code
            result["events"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    worker = threading.Thread(target=stream)
    worker.start()
    time.sleep(0.8)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        chat = f"{url}/v1/chat/completions"
        late = httpx.post(chat, json=_body(4), headers=AUTH, timeout=10).status_code
    except httpx.TransportError:
        late = "refused"
    worker.join(timeout=60)
    assert late in (503, "refused")
    assert result["status"] == 200 and result["events"][-1] == "data: [DONE]"
    usage = json.loads(result["events"][-2][len("data: ") :])["usage"]
    assert usage["completion_tokens"] == tokens
    # uvicorn re-raises the signal once its graceful shutdown is done: "terminated by SIGTERM"
    # after the stream above was served in full is the drained exit
    assert process.wait(timeout=DRAIN_SECONDS + 30) in (0, -signal.SIGTERM)
    assert "draining: new requests get 503" in log.read_text()
