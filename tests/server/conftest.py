"""A real `stts-serve` process on 127.0.0.1 with the real engine on a demo checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from stts_vllm.checkpoint import make_demo

API_KEY = "test-key"
MAX_IN_FLIGHT = 40


@dataclass(frozen=True)
class Server:
    url: str
    media_root: Path
    log: Path

    def client(self, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    model = make_demo(root / "model")
    media_root = root / "media"
    media_root.mkdir()
    port = _free_port()
    log_path = root / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env |= {
        "STTS_API_KEY": API_KEY,
        "STTS_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
        "STTS_FILES_DIR": str(root / "files"),
        "STTS_MAX_FILES": "4",
        "STTS_MAX_VIDEO_PIXELS": str(640 * 480),
        "STTS_MAX_VIDEO_SECONDS": "120",
        "STTS_MEDIA_ROOT": str(media_root),
        "STTS_MAX_FRAMES": "64",
    }
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "--model",
                str(model),
                "--port",
                str(port),
                "--max-model-len",
                "8192",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"server not ready in 300 s:\n{log_path.read_text()[-4000:]}")
        yield Server(url=url, media_root=media_root, log=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
