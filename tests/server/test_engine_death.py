"""When vLLM's engine process dies (a crash in a forward pass, the OOM killer), the server says so
(503 `engine_dead`, failing /health and /ready) rather than answering 500s forever, and by default
stops with exit status 1 so that Docker or Kubernetes restarts it. The engine is killed for real."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from stts_vllm.demo import make_demo
from tests.processes import free_port, server_env, server_process


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("engine-death") / "model")


def _argv(model: Path, port: int) -> list[str]:
    argv = [sys.executable, "-m", "server.cli", "--model", str(model), "--port", str(port)]
    return [*argv, "--max-model-len", "4096"]


def _kill_engine_core(server: subprocess.Popen) -> None:
    cores = [
        p for p in psutil.Process(server.pid).children() if p.name().startswith("VLLM::EngineCor")
    ]
    assert len(cores) == 1, [p.name() for p in psutil.Process(server.pid).children()]
    cores[0].send_signal(signal.SIGKILL)


def _wait_for(check, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_dead_engine_ends_streams_answers_503_and_fails_health(
    demo_checkpoint: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_env(STTS_EXIT_ON_ENGINE_DEATH="false")
    with server_process(_argv(demo_checkpoint, port), url, "/ready", tmp_path / "log", env) as proc:
        body = {"model": "stts-demo", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        long = body | {"max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")  # streaming has begun
            _kill_engine_core(proc)
            rest = [line for line in lines if line]
        # mid-stream: an error event, then [DONE], as vLLM ends every stream
        assert rest[-1] == "data: [DONE]", rest[-3:]
        assert json.loads(rest[-2].removeprefix("data: "))["error"]["code"] == "engine_dead"
        _wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 503)
        assert httpx.get(f"{url}/health").json() == {"status": "engine_dead"}
        assert httpx.get(f"{url}/ready").status_code == 503
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_dead"
        assert "restarted" in response.json()["error"]["message"]
        assert proc.poll() is None  # kept up, as configured


def test_dead_engine_stops_the_server_with_status_1(demo_checkpoint: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "log"
    with server_process(_argv(demo_checkpoint, port), url, "/ready", log, server_env()) as proc:
        _kill_engine_core(proc)
        assert proc.wait(timeout=90) == 1, log.read_text()[-3000:]
    assert "the inference engine died" in log.read_text()
