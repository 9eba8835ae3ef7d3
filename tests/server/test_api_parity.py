"""`stts-serve` against vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`)
on the same tiny checkpoint, with the same tool-call flags: one table of requests, each field
valid and out of range, sent to both. Status classes and response keys agree on every row,
except the documented differences (`DOCUMENTED`, also in docs/api.md's API table): fields
this server refuses because it cannot honour them, where vLLM accepts and drops them, and our
`stts` report.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from media import encode_mp4, moving_square_video

from stts_vllm.demo import make_demo
from tests.processes import CPU_MEMORY_SHARE, free_port, server_env, server_process
from tests.server.helpers import TOOL_FLAGS

MODEL = "stts-demo"
VIDEO_URL = (
    "data:video/mp4;base64,"
    + base64.b64encode(encode_mp4(moving_square_video(16, 112, 112, seed=11), fps=4)).decode()
)

# Rows where the two servers answer differently on purpose (docs/api.md, "API table").
DOCUMENTED = {
    "audio": "refused: no audio output (vLLM ignores it)",
    "modalities audio": "refused: text is the only output modality (vLLM ignores it)",
    "logit_bias 150": "refused: outside OpenAI's [-100, 100] (vLLM clamps)",
    "functions": "refused: deprecated, use tools (vLLM ignores it)",
    "mm_processor_kwargs max_pixels": "refused: the server sizes frames (vLLM passes it on)",
    "frames conflict": "refused: stts.num_frames and media_io_kwargs disagree (vLLM has no stts)",
}


# The checkpoint's sampling defaults (generation_config.json), applied by both servers.
GENERATION_DEFAULTS = {"temperature": 0.0, "max_new_tokens": 5}


@dataclass(frozen=True)
class Pair:
    ours: str
    vllm: str


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Each server started once for the module."""
    root = tmp_path_factory.mktemp("parity")
    model = make_demo(root / "model")
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(generation | GENERATION_DEFAULTS))
    ours_port, vllm_port = free_port(), free_port()
    common = ["--max-model-len", "4096", *TOOL_FLAGS]
    ours = [sys.executable, "-m", "server.cli", "--model", str(model), "--port", str(ours_port)]
    ours += ["--default-max-tokens", "7"]  # the checkpoint's max_new_tokens comes first
    vllm = [
        *[sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)],
        *["--served-model-name", MODEL, "--dtype", "float32", "--enforce-eager"],
        *["--port", str(vllm_port), "--trust-request-mm-kwargs"],
        *["--gpu-memory-utilization", CPU_MEMORY_SHARE],
    ]
    urls = Pair(f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{vllm_port}")
    env = server_env(STTS_FILES_DIR=str(root / "files"))
    with ExitStack() as stack:
        stack.enter_context(
            server_process([*ours, *common], urls.ours, "/ready", root / "ours.log", env)
        )
        stack.enter_context(
            server_process([*vllm, *common], urls.vllm, "/health", root / "vllm.log", env)
        )
        yield urls


USER = [{"role": "user", "content": "Name a colour."}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_colour",
        "description": "Look a colour up.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
            "required": ["colour"],
            "additionalProperties": False,
        },
    },
}
ENUM_SCHEMA = {
    "name": "answer",
    "schema": {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    },
}
HISTORY = [
    {"role": "user", "content": "Which colour?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_colour", "arguments": '{"colour": "red"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "red"},
]


def _video(**extra: Any) -> dict[str, Any]:
    content = [
        {"type": "video_url", "video_url": {"url": VIDEO_URL}},
        {"type": "text", "text": "What moves?"},
    ]
    return {"messages": [{"role": "user", "content": content}], **extra}


ROWS: dict[str, dict[str, Any]] = {
    "plain": {},
    "no model name": {"model": None},
    "unknown model": {"model": "gpt-4"},
    "temperature 0": {"temperature": 0},
    "temperature 2.5": {"temperature": 2.5},
    "top_p 0.5": {"top_p": 0.5},
    "top_p 1.5": {"top_p": 1.5},
    "top_k 5": {"top_k": 5},
    "top_k -2": {"top_k": -2},
    "min_p 0.1": {"min_p": 0.1},
    "min_p 1.5": {"min_p": 1.5},
    "presence_penalty 1": {"presence_penalty": 1.0},
    "presence_penalty 3.5": {"presence_penalty": 3.5},
    "frequency_penalty -1": {"frequency_penalty": -1.0},
    "frequency_penalty -2.5": {"frequency_penalty": -2.5},
    "repetition_penalty 1.2": {"repetition_penalty": 1.2},
    "repetition_penalty 0": {"repetition_penalty": 0},
    "logit_bias": {"logit_bias": {"100": 5}},
    "logit_bias 150": {"logit_bias": {"100": 150}},
    "logit_bias not a token": {"logit_bias": {"abc": 1}},
    "stop": {"stop": ["zz"]},
    "stop_token_ids": {"stop_token_ids": [5]},
    "stop_token_ids text": {"stop_token_ids": ["a"]},
    "seed": {"seed": 7},
    "seed 2**64": {"seed": 2**64},
    "n 2": {"n": 2, "temperature": 1.0},
    "n 0": {"n": 0},
    "n 2 greedy": {"n": 2, "temperature": 0},
    "user": {"user": "user-1"},
    "logprobs": {"logprobs": True, "top_logprobs": 3},
    "top_logprobs 21": {"logprobs": True, "top_logprobs": 21},
    "top_logprobs without logprobs": {"top_logprobs": 2},
    "top_logprobs -2": {"logprobs": True, "top_logprobs": -2},
    "max_tokens 0": {"max_tokens": 0},
    "max_tokens beyond context": {"max_tokens": 100_000},
    "max_completion_tokens": {"max_completion_tokens": 2},
    "min_tokens": {"min_tokens": 2},
    "json_object": {"response_format": {"type": "json_object"}, "max_tokens": 8},
    "json_schema": {
        "response_format": {"type": "json_schema", "json_schema": ENUM_SCHEMA},
        "max_tokens": 200,
        "temperature": 0,
    },
    "json_schema missing": {"response_format": {"type": "json_schema"}},
    "response_format xml": {"response_format": {"type": "xml"}},
    "tool_choice none": {"tools": [TOOL], "tool_choice": "none"},
    "tool_choice auto": {"tools": [TOOL], "tool_choice": "auto"},
    "tool_choice required": {
        "tools": [TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 200,
        "temperature": 0,
    },
    "tool_choice named": {
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_colour"}},
        "max_tokens": 200,
        "temperature": 0,
    },
    "tool_choice named unknown": {
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "nope"}},
    },
    "tool_choice without tools": {"tool_choice": "required"},
    "tools empty": {"tools": []},
    "tool history": {"messages": HISTORY, "tools": [TOOL]},
    "stream_options without stream": {"stream_options": {"include_usage": True}},
    "unknown field": {"frobnicate": 1},
    "audio": {"audio": {"voice": "alloy", "format": "wav"}},
    "modalities text": {"modalities": ["text"]},
    "modalities audio": {"modalities": ["text", "audio"]},
    "functions": {"functions": [TOOL["function"]]},
    "messages empty": {"messages": []},
    "custom role": {"messages": [{"role": "narrator", "content": "Once."}, *USER]},
    "video": _video(),
    "video mm_processor_kwargs": _video(mm_processor_kwargs={"num_frames": 4}),
    "video media_io_kwargs": _video(media_io_kwargs={"video": {"num_frames": 4}}),
    "mm_processor_kwargs max_pixels": _video(mm_processor_kwargs={"max_pixels": 20000}),
    "frames conflict": _video(stts={"num_frames": 8}, media_io_kwargs={"video": {"num_frames": 4}}),
}


def _shape(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    """Status class and the key sets of the body (top level, first choice, its message)."""
    body = response.json()
    shape: dict[str, Any] = {"top": sorted(set(body) - {"stts"})}
    if "error" in body:
        shape["error"] = sorted(body["error"])
    for choice in body.get("choices", [])[:1]:
        shape["choice"] = sorted(choice)
        shape["message"] = sorted(choice.get("message", {}))
        shape["tool_calls"] = bool(choice["message"].get("tool_calls"))
    return response.status_code // 100, shape


def _send(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


@pytest.mark.parametrize("row", list(ROWS))
def test_same_answer_shape_as_vllm(servers: Pair, row: str) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 3} | ROWS[row]
    body = {k: v for k, v in body.items() if v is not None}
    ours, theirs = _send(servers.ours, body), _send(servers.vllm, body)
    if row in DOCUMENTED:
        assert ours.status_code == 400, ours.text
        assert theirs.status_code // 100 != 4, theirs.text  # still a documented difference
        return
    assert _shape(ours) == _shape(theirs), (ours.text[:2000], theirs.text[:2000])
    if ours.status_code == 400:
        assert ours.json()["error"]["message"] and ours.json()["error"]["param"]
    if row == "json_schema":  # the enum leaves a random model no room to ramble
        for reply in (ours, theirs):
            choice = reply.json()["choices"][0]
            assert choice["finish_reason"] == "stop", choice
            assert json.loads(choice["message"]["content"])["answer"] in ("yes", "no")


def _sse(url: str, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        return [line for line in r.iter_lines() if line]


def _chunk_shapes(lines: list[str]) -> list[tuple[Any, ...]]:
    shapes = []
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        choices = chunk.get("choices") or [{}]
        shapes.append(
            (
                tuple(sorted(set(chunk) - {"stts"})),
                tuple(sorted(choices[0])),
                "finish_reason" in choices[0] and choices[0].get("finish_reason") is None,
            )
        )
    return shapes


@pytest.mark.parametrize(
    "extra",
    [
        {"stream_options": {"include_usage": True}},
        {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        {"logprobs": True, "top_logprobs": 2},
        {"n": 2, "temperature": 1.0, "seed": 1},
    ],
    ids=["usage", "continuous usage", "logprobs", "n 2"],
)
def test_same_stream_shape_as_vllm(servers: Pair, extra: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, "stream": True, "temperature": 0}
    ours, theirs = _sse(servers.ours, body | extra), _sse(servers.vllm, body | extra)
    assert ours[-1] == theirs[-1] == "data: [DONE]"
    # the same kinds of chunk; how many depends on timing (vLLM merges the deltas of a slow
    # reader, and interleaves the choices of n > 1 as they come)
    assert set(_chunk_shapes(ours)) == set(_chunk_shapes(theirs))
    assert _chunk_shapes(ours)[-1] == _chunk_shapes(theirs)[-1]


def test_generation_config_defaults_like_vllm(servers: Pair) -> None:
    """No max_tokens, no temperature: the checkpoint's max_new_tokens and (greedy) temperature,
    so both servers give the same five tokens."""
    body = {"model": MODEL, "messages": USER, "ignore_eos": True}
    ours, theirs = (_send(url, body).json() for url in (servers.ours, servers.vllm))
    assert ours["usage"]["completion_tokens"] == theirs["usage"]["completion_tokens"] == 5
    assert ours["choices"][0]["message"] == theirs["choices"][0]["message"]
