"""`stts-vllm serve-demo` serves the demo checkpoint through vLLM's own OpenAI server
(multiprocess engine: the plugin loads in every process) and answers a video question."""

from __future__ import annotations

import base64
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from media import encode_mp4, moving_square_video

from stts_vllm.core import retained_count
from tests.processes import free_port, server_env, server_process


@pytest.fixture(scope="module")
def server(demo_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "stts_vllm.cli",
        "serve-demo",
        str(demo_ckpt),
        "--port",
        str(port),
        "--max-model-len",
        "8192",
    ]
    log = tmp_path_factory.mktemp("server") / "server.log"
    url = f"http://127.0.0.1:{port}"
    with server_process(argv, url, "/health", log, server_env()):
        yield url


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
