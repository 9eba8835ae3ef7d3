"""A real `stts-serve` process on 127.0.0.1 with the real engine on a demo checkpoint."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from stts_vllm.checkpoint import make_demo
from tests.processes import free_port, server_env, server_process

API_KEY = "test-key"
TOOL_FLAGS = ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"]  # as for vllm serve
MAX_IN_FLIGHT = 40
DEFAULT_MAX_TOKENS = 12  # what a request without max_tokens gets (the demo sets no default)
MAX_REQUEST_BYTES = 24 * 1024 * 1024
MAX_VIDEO_BYTES = 16 * 1024 * 1024
MAX_DECODED_FRAMES = 1500
REMOTE_ALLOWLIST = '["localhost", "64:ff9b::7f00:1", "::ffff:10.0.0.1"]'  # all non-public


@dataclass(frozen=True)
class Server:
    url: str
    media_root: Path
    log: Path
    files_dir: Path

    def client(self, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    model = make_demo(root / "model")
    media_root = root / "media"
    media_root.mkdir()
    port = free_port()
    env = server_env(
        STTS_API_KEY=API_KEY,
        STTS_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
        STTS_FILES_DIR=str(root / "files"),
        STTS_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),
        STTS_MAX_VIDEO_BYTES=str(MAX_VIDEO_BYTES),
        STTS_MAX_DECODED_FRAMES=str(MAX_DECODED_FRAMES),
        STTS_REMOTE_MEDIA_ALLOWLIST=REMOTE_ALLOWLIST,
        STTS_MAX_FILES="4",
        STTS_MAX_VIDEO_PIXELS=str(640 * 480),
        STTS_MAX_VIDEO_SECONDS="120",
        STTS_MEDIA_ROOT=str(media_root),
        STTS_MAX_FRAMES="64",
    )
    argv = [
        sys.executable,
        "-m",
        "server.cli",
        "--model",
        str(model),
        "--port",
        str(port),
        "--max-model-len",
        "8192",
        *TOOL_FLAGS,
        "--default-max-tokens",
        str(DEFAULT_MAX_TOKENS),
    ]
    log = root / "server.log"
    url = f"http://127.0.0.1:{port}"
    with server_process(argv, url, "/ready", log, env):
        yield Server(url=url, media_root=media_root, log=log, files_dir=root / "files")
