"""`stts-vllm serve-demo` serves the demo checkpoint through vLLM's own OpenAI server
(multiprocess engine: the plugin loads in every process) and answers a video question."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from media import encode_mp4, moving_square_video

from stts_vllm.core import retained_count


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(demo_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w+")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stts_vllm.cli",
            "serve-demo",
            str(demo_ckpt),
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
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("server did not become healthy in 240 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_demo_server_answers_a_video_question(server: str) -> None:
    from openai import OpenAI

    video = encode_mp4(moving_square_video(16, 112, 168, seed=21), fps=4)
    data_url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    client = OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": data_url}},
                {"type": "text", "text": "What moves in this video?"},
            ],
        }
    ]
    full = client.chat.completions.create(
        model="stts-demo",
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body={"mm_processor_kwargs": {"stts_keep_ratio": 1.0}},
    )
    pruned = client.chat.completions.create(
        model="stts-demo",
        messages=messages,
        max_tokens=8,
        temperature=0,
    )
    assert pruned.choices[0].message.content and full.choices[0].message.content
    # The checkpoint's default keep ratio (0.5) prunes the video's placeholders: 112x168
    # frames are 4x6 = 24 units a step; the server picks the step count T by fps.
    saved = full.usage.prompt_tokens - pruned.usage.prompt_tokens
    steps = saved // 12
    assert steps >= 2 and saved == steps * 24 - retained_count(steps, 24, 0.5)
