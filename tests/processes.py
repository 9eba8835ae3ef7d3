"""Starting a real server process for tests: free port, log file, wait until ready, stop."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CPU_MEMORY_SHARE = "0.2"
"""Test servers run side by side (the session's server, a module's own, vLLM's for parity).
On the CPU backend `gpu_memory_utilization` is the share of the NUMA node's memory that must
be free at start-up, so vLLM's 0.9 refuses every server after the first."""


def server_env(**extra: str) -> dict[str, str]:
    """This environment, minus the in-process engine switch of the engine tests (a server
    runs vLLM's usual multiprocess engine), with a CPU memory share that lets test servers
    coexist, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    return env | {"STTS_GPU_MEMORY_UTILIZATION": CPU_MEMORY_SHARE} | extra


@contextmanager
def server_process(
    argv: list[str],
    url: str,
    ready_path: str,
    log: Path,
    env: dict[str, str],
    timeout: float = 300,
    own_group: bool = False,
) -> Iterator[subprocess.Popen]:
    """Runs `argv` until the `with` ends; yields the process once `url + ready_path` answers
    200. `own_group`: in a process group of its own, so that a test can kill it with its
    children (vLLM's engine processes) at once, as a container runtime kills a pod."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=own_group
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in {timeout:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
