"""Server-wide defaults a request can override. `--keep-ratio`: the default keep ratio, so one
checkpoint serves an evaluation's sweep of ratios; a request's `stts.keep_ratio` or
`mm_processor_kwargs.stts_keep_ratio` still wins, and a stock checkpoint (which cannot prune)
refuses a ratio below 1 at start-up. `--frames-as-video off`: image parts stay images."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from media import encode_video, moving_square_video
from PIL import Image

from server.engine import read_model_facts
from server.settings import Settings
from stts_vllm.checkpoint import derive
from stts_vllm.core import retained_count
from stts_vllm.demo import make_demo
from tests.processes import free_port, server_env, server_process
from tests.server.helpers import data_url, video_message

SERVER_KEEP = 0.25


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("keep-flag") / "model", keep_ratio=0.5)


@pytest.fixture(scope="module")
def url(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "--model", str(checkpoint), "--port", str(port)]
    argv += ["--max-model-len", "8192", "--keep-ratio", str(SERVER_KEEP)]
    argv += ["--frames-as-video", "off", "--max-media-per-message", "8"]
    log = tmp_path_factory.mktemp("keep-flag-log") / "server.log"
    with server_process(argv, f"http://127.0.0.1:{port}", "/ready", log, server_env()):
        yield f"http://127.0.0.1:{port}"


def test_the_flag_and_its_env_var_set_the_default_and_unset_keeps_the_checkpoints(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read_model_facts(Settings(model=checkpoint)).default_keep_ratio == 0.5
    assert read_model_facts(Settings(model=checkpoint, keep_ratio=0.3)).default_keep_ratio == 0.3
    monkeypatch.setenv("STTS_KEEP_RATIO", "0.7")
    assert read_model_facts(Settings(model=checkpoint)).default_keep_ratio == 0.7


def _ask(url: str, **extra: Any) -> dict[str, Any]:
    clip = encode_video(moving_square_video(8, 112, 112), fps=4)
    body = {
        "model": "stts-demo",
        "max_tokens": 1,
        "messages": video_message(data_url(clip)),
        "stts": {"num_frames": 8, "test_time_scaling": False, **extra.pop("stts", {})},
        **extra,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    ("extra", "keep"),
    [
        ({}, SERVER_KEEP),
        ({"stts": {"keep_ratio": 0.5}}, 0.5),
        ({"mm_processor_kwargs": {"stts_keep_ratio": 0.75}}, 0.75),
    ],
    ids=["server default", "stts.keep_ratio wins", "mm_processor_kwargs wins"],
)
def test_a_request_without_a_ratio_takes_the_servers(
    url: str, extra: dict[str, Any], keep: float
) -> None:
    reply = _ask(url, **extra)
    report = reply["stts"]
    (video,) = report["videos"]
    steps, units_h, units_w = video["grid_thw"]
    assert report["keep_ratio"] == keep
    assert video["video_tokens_after"] == retained_count(steps, units_h * units_w, keep)
    # the engine pruned to the same count: the prompt shrinks by exactly the saving
    full = _ask(url, stts={"keep_ratio": 1.0})
    saved = full["usage"]["prompt_tokens"] - reply["usage"]["prompt_tokens"]
    assert saved == report["tokens_saved"] > 0


def test_a_stock_checkpoint_refuses_a_ratio_below_one_at_start(
    checkpoint: Path, tmp_path: Path
) -> None:
    stock = derive(checkpoint, tmp_path / "stock", stock=True)
    argv = [sys.executable, "-m", "server.cli", "--model", str(stock)]
    result = subprocess.run(
        [*argv, "--port", str(free_port()), "--keep-ratio", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "--keep-ratio 0.5" in result.stderr and "cannot prune" in result.stderr
    assert read_model_facts(Settings(model=stock, keep_ratio=1.0)).default_keep_ratio == 1.0


def test_a_ratio_outside_0_1_is_refused_by_the_flag(checkpoint: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "--model", str(checkpoint), "--keep-ratio", "1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "keep_ratio" in result.stderr, result.stderr[-2000:]


def test_frames_as_video_off_keeps_image_parts_images(url: str) -> None:
    """Eight frame images, which `auto` reads as one video, are eight images here (as before
    the policy existed), and a request can still ask for one video."""
    buffer = io.BytesIO()
    Image.new("RGB", (112, 112), (200, 30, 30)).save(buffer, format="PNG")
    image = {"type": "image_url", "image_url": {"url": data_url(buffer.getvalue(), "image/png")}}
    content = [image] * 8 + [{"type": "text", "text": "?"}]
    body = {
        "model": "stts-demo",
        "max_tokens": 1,
        "messages": [{"role": "user", "content": content}],
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json().get("stts") is None  # no video: nothing pruned, no report
    body["stts"] = {"frames_as_video": True}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    (video,) = response.json()["stts"]["videos"]
    assert video["frames_collapsed"] == 8
