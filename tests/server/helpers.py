"""What the server tests share: the test server's settings and handle, requests, error checks
and metrics. A plain module: test modules import from here, never from each other."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-key"
TOOL_FLAGS = ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"]  # as for vllm serve
MAX_IN_FLIGHT = 40
DEFAULT_MAX_TOKENS = 12  # what a request without max_tokens gets (the demo sets no default)
MAX_REQUEST_BYTES = 24 * 1024 * 1024
MAX_VIDEO_BYTES = 16 * 1024 * 1024
MAX_DECODED_FRAMES = 1500
MAX_FRAMES = 64
REMOTE_ALLOWLIST = '["localhost", "64:ff9b::7f00:1", "::ffff:10.0.0.1"]'  # all non-public
SUMMARY = pytest.StashKey[list[str]]()
"""Lines a test measured (times, counts) that the session prints after its results."""


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


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def video_message(url: Any) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": url}},
                {"type": "text", "text": "?"},
            ],
        }
    ]


def chat(server: Server, **body: Any) -> httpx.Response:
    """A chat completion over plain HTTP (two tokens unless `max_tokens` says otherwise)."""
    payload = {"model": "stts-demo", "max_tokens": 2} | body
    with server.client() as client:
        return client.post("/v1/chat/completions", json=payload)


def assert_error(response: httpx.Response, status: int, code: str | None, text: str) -> None:
    """An OpenAI-style error: the status, exactly the four fields, the code, the text."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    assert text.lower() in error["message"].lower(), error["message"]


def assert_answered(reply: dict[str, Any], max_tokens: int) -> None:
    """A chat completion that really generated: `max_tokens` tokens counted in its usage, a
    string as the message (a random model's tokens may decode to nothing visible), and the
    `length` finish that `max_tokens` forces."""
    (choice,) = reply["choices"]
    assert isinstance(choice["message"]["content"], str), choice
    assert reply["usage"]["completion_tokens"] == max_tokens, reply["usage"]
    assert choice["finish_reason"] == "length", choice


def metric_values(server: Server) -> dict[str, float]:
    """`name{label="v",...}` -> value, parsed with prometheus_client's own parser."""
    text = httpx.get(f"{server.url}/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values
