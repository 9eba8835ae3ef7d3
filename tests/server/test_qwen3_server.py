"""`stts-serve` on a Qwen3-VL STTS checkpoint converted from a stock one: the geometry comes
from its processor config (16 px patches, a video's pixel volume), the prompt carries each
step's real time, and the `stts` report shows the saving. Checkpoints the server cannot serve
stop it at start-up with the field named."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from media import encode_video, moving_square_video

from server.engine import read_model_facts
from server.settings import Settings
from stts_vllm.checkpoint import read_config
from stts_vllm.core import step_quotas
from tests.processes import free_port, server_env
from tests.server.helpers import Server


@pytest.fixture(scope="module")
def checkpoint(qwen3_checkpoint: Path) -> Path:
    return qwen3_checkpoint


@pytest.fixture(scope="module")
def url(qwen3_server: Server) -> str:
    return qwen3_server.url


def test_geometry_is_read_from_the_processor_config(checkpoint: Path) -> None:
    facts = read_model_facts(Settings(model=checkpoint))
    assert facts.is_stts and facts.default_keep_ratio == 0.5
    geometry = facts.geometry
    assert (geometry.patch_size, geometry.merge_size, geometry.temporal_patch_size) == (16, 2, 2)
    assert geometry.per_video_pixels and geometry.timestamped


def test_converted_qwen3_answers_through_the_openai_client(url: str) -> None:
    from openai import OpenAI

    clip = encode_video(moving_square_video(16, 128, 160), fps=4)
    data_url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    client = OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
    response = client.chat.completions.create(
        model="stts-demo",
        max_tokens=4,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": data_url}},
                    {"type": "text", "text": "What moves?"},
                ],
            }
        ],
        extra_body={"stts": {"num_frames": 8}, "ignore_eos": True},
    )
    (choice,) = response.choices
    assert isinstance(choice.message.content, str) and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 4
    report = response.model_extra["stts"]
    (video,) = report["videos"]
    steps, units_h, units_w = video["grid_thw"]
    assert (video["frames_sampled"], steps) == (8, 4)
    assert video["video_tokens_before"] == steps * units_h * units_w
    assert video["video_tokens_after"] == sum(step_quotas(steps, units_h * units_w, 0.5))
    assert report["tokens_saved"] == video["video_tokens_before"] - video["video_tokens_after"]
    assert report["tokens_saved"] > 0
    # the engine saw exactly the reported number of video tokens
    assert response.usage.prompt_tokens > video["video_tokens_after"]


def _start(model: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "--model", str(model), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env=server_env(),
    )


def _copy_without(src: Path, out: Path, **edits: dict) -> Path:
    """`src` with some JSON files edited (the rest linked)."""
    out.mkdir()
    for item in src.iterdir():
        if item.name not in edits:
            (out / item.name).symlink_to(item.resolve())
    for name, edit in edits.items():
        data = json.loads((src / name).read_text())
        edit(data)
        (out / name).write_text(json.dumps(data))
    return out


def test_a_processor_config_without_geometry_stops_the_server(
    checkpoint: Path, tmp_path: Path
) -> None:
    def drop_patch_size(data: dict) -> None:
        del data["video_processor"]["patch_size"]

    model = _copy_without(
        checkpoint, tmp_path / "no-patch", **{"processor_config.json": drop_patch_size}
    )
    result = _start(model)
    assert result.returncode != 0
    assert re.search(r"video processor config has no integer 'patch_size'", result.stderr)


def test_an_unsupported_architecture_stops_the_server(checkpoint: Path, tmp_path: Path) -> None:
    def other_architecture(data: dict) -> None:
        data["architectures"] = ["LlavaForConditionalGeneration"]

    model = _copy_without(checkpoint, tmp_path / "llava", **{"config.json": other_architecture})
    result = _start(model)
    assert result.returncode != 0
    assert "LlavaForConditionalGeneration" in result.stderr
    assert "Qwen3VLForConditionalGeneration" in result.stderr  # the supported ones are named
    assert read_config(checkpoint)["architectures"] == ["STTSQwen3VLForConditionalGeneration"]


def test_frames_with_timestamps_put_the_clients_times_in_the_prompt(
    url: str, checkpoint: Path
) -> None:
    """lmms-eval's Qwen3-VL message format (`<t seconds>` before each frame image) is one
    pruned video whose prompt carries one timestamp per temporal step: the mean of its two
    frames' client times, as Qwen3-VL's processor prints them."""
    import io

    import httpx
    from PIL import Image
    from transformers import AutoTokenizer

    times = [0.0, 1.0, 2.0, 3.0, 6.0, 7.0, 10.0, 11.0]
    content: list[dict] = []
    for t, frame in zip(times, moving_square_video(len(times), 128, 160, seed=4), strict=True):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        url_ = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content += [{"type": "text", "text": f"<{t:g} seconds>"}]
        content += [{"type": "image_url", "image_url": {"url": url_}}]
    content.append({"type": "text", "text": "What moves?"})
    body = {
        "model": "stts-demo",
        "max_tokens": 1,
        "return_token_ids": True,
        "messages": [{"role": "user", "content": content}],
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    reply = response.json()
    (video,) = reply["stts"]["videos"]
    assert video["frames_collapsed"] == 8
    steps, units_h, units_w = video["grid_thw"]
    assert video["video_tokens_after"] == sum(step_quotas(steps, units_h * units_w, 0.5))
    prompt = AutoTokenizer.from_pretrained(checkpoint).decode(reply["prompt_token_ids"])
    stamps = re.findall(r"<(\d+\.\d) seconds><\|vision_start\|>", prompt)
    assert stamps == ["0.5", "2.5", "6.5", "10.5"]
    assert prompt.count("<|video_pad|>") == video["video_tokens_after"]
