"""Real `stts-serve` processes on 127.0.0.1 with the real engine: the session's server on the
Qwen2.5-VL demo checkpoint, and one on a Qwen3-VL checkpoint converted from a stock one."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stts_vllm.checkpoint import convert, derive
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
    SUMMARY,
    TOOL_FLAGS,
    Server,
)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[SUMMARY] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config):
    """Figures the server tests measured (e.g. the lmms-eval runs' times), after the results."""
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.write_sep("-", "server test figures")
        for line in lines:
            terminalreporter.write_line(line)


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


@pytest.fixture(scope="session")
def qwen3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3-VL demo saved as a stock checkpoint, then converted to STTS (keep 0.5):
    the path a user's real checkpoint takes."""
    root = tmp_path_factory.mktemp("qwen3-server")
    stock = derive(make_demo(root / "demo", family="qwen3_vl"), root / "stock", stock=True)
    return convert(stock, root / "stts", keep_ratio=0.5, prune_at=1)


@pytest.fixture(scope="session")
def qwen3_server(qwen3_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """`stts-serve` on `qwen3_checkpoint` with its defaults, but a media root for `file://`."""
    root = tmp_path_factory.mktemp("qwen3-serve")
    media_root = root / "media"
    media_root.mkdir()
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "--model", str(qwen3_checkpoint)]
    argv += ["--port", str(port), "--max-model-len", "8192", "--media-root", str(media_root)]
    env = server_env(STTS_FILES_DIR=str(root / "files"))
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    with server_process(argv, url, "/ready", log, env):
        yield Server(url=url, media_root=media_root, log=log, files_dir=root / "files")
