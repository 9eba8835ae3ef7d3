"""A real `stts-serve` process on 127.0.0.1 with the real engine on a demo checkpoint."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from stts_vllm.demo import make_demo
from tests.processes import free_port, server_env, server_process
from tests.server.helpers import (
    API_KEY,
    DEFAULT_MAX_TOKENS,
    MAX_DECODED_FRAMES,
    MAX_FRAMES,
    MAX_IN_FLIGHT,
    MAX_REQUEST_BYTES,
    MAX_VIDEO_BYTES,
    REMOTE_ALLOWLIST,
    TOOL_FLAGS,
    Server,
)


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
        STTS_MAX_FRAMES=str(MAX_FRAMES),
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
