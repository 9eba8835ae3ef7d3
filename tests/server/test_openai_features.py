"""OpenAI API features through the official `openai` client on the real server and engine: the
answers parse into the client's own types (logprobs, JSON schema via `parse`, a required tool
call, streaming with usage)."""

from __future__ import annotations

import base64
import json
from typing import Literal

import pytest
from media import encode_mp4, moving_square_video
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from tests.server.helpers import DEFAULT_MAX_TOKENS, Server

VIDEO_URL = (
    "data:video/mp4;base64,"
    + base64.b64encode(encode_mp4(moving_square_video(12, 112, 112, seed=21), fps=4)).decode()
)
USER = [{"role": "user", "content": "Which colour is the square?"}]
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


class Answer(BaseModel):
    answer: Literal["yes", "no"]


def test_logprobs(server: Server) -> None:
    reply = server.openai().chat.completions.create(
        model="stts-demo",
        messages=USER,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    assert isinstance(reply, ChatCompletion)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 4
    for token in content:  # vLLM lists the sampled token first, then the most likely ones
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token
    # a byte-fallback token that is not whole UTF-8 on its own shows as U+FFFD in logprobs and is
    # left out of the detokenized text: compare the rest
    joined = "".join(t.token for t in content).replace("\ufffd", "")
    assert joined == reply.choices[0].message.content.replace("\ufffd", "")


def test_logprobs_streaming(server: Server) -> None:
    stream = server.openai().chat.completions.create(
        model="stts-demo", messages=USER, max_tokens=4, logprobs=True, top_logprobs=2, stream=True
    )
    logprobs = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    tokens = [t for step in logprobs for t in step.content]
    assert len(tokens) == 4 and all(len(t.top_logprobs) == 2 for t in tokens)


def test_json_schema_parses_into_the_clients_model(server: Server) -> None:
    """A random tiny model: the `enum` leaves it no room to ramble."""
    reply = server.openai().chat.completions.parse(
        model="stts-demo", messages=USER, max_tokens=40, temperature=0, response_format=Answer
    )
    assert isinstance(reply.choices[0].message.parsed, Answer)


def test_json_object(server: Server) -> None:
    """Structured output holds the text to a JSON object. A random model may ramble inside a
    string up to max_tokens (greedy, the demo does): then what it wrote must still be the start
    of an object, which free text is not."""
    from partial_json_parser import loads as loads_partial  # vLLM's own, for tool calls

    reply = server.openai().chat.completions.create(
        model="stts-demo",
        messages=USER,
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_object"},
    )
    choice = reply.choices[0]
    content = choice.message.content
    assert content is not None and content.startswith("{"), content
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(content), dict), content
    else:
        assert choice.finish_reason == "length" and reply.usage.completion_tokens == 200
        assert isinstance(loads_partial(content), dict), content


def test_required_tool_call(server: Server) -> None:
    reply = server.openai().chat.completions.create(
        model="stts-demo",
        messages=USER,
        max_tokens=200,  # greedy JSON from a random model: ~90 tokens, whitespace included
        temperature=0,
        tools=[TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_colour"
    assert json.loads(call.function.arguments)["colour"] in ("red", "blue")


def test_named_tool_call_and_tool_history(server: Server) -> None:
    client = server.openai()
    first = client.chat.completions.create(
        model="stts-demo",
        messages=USER,
        max_tokens=200,  # greedy JSON from a random model: ~90 tokens, whitespace included
        temperature=0,
        tools=[TOOL],
        tool_choice={"type": "function", "function": {"name": "get_colour"}},
    )
    (call,) = first.choices[0].message.tool_calls
    history = [
        *USER,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "red"},
    ]
    second = client.chat.completions.create(
        model="stts-demo", messages=history, max_tokens=3, tools=[TOOL], tool_choice="none"
    )
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


def test_streaming_with_usage_and_report(server: Server) -> None:
    content = [
        {"type": "video_url", "video_url": {"url": VIDEO_URL}},
        {"type": "text", "text": "What moves?"},
    ]
    stream = server.openai().chat.completions.create(
        model="stts-demo",
        messages=[{"role": "user", "content": content}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    *body, last = chunks
    # the random demo model may sample its end token before max_tokens
    finish = next(c.choices[0].finish_reason for c in body if c.choices[0].finish_reason)
    assert not last.choices and 0 < last.usage.completion_tokens <= 5
    assert (last.usage.completion_tokens == 5) == (finish == "length")
    assert last.model_extra["stts"]["videos"][0]["frames_sampled"] == 6  # 3 s at 2 fps
    assert all(c.usage is not None for c in body)  # continuous usage stats
    finishes = [c.choices[0].finish_reason for c in body if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"presence_penalty": 3.5}, "presence_penalty"),
        ({"seed": 2**64}, "seed"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text"]}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
    ],
)
def test_refusals_name_the_parameter(server: Server, extra: dict, param: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().chat.completions.create(
            model="stts-demo", messages=USER, max_tokens=2, **extra
        )
    assert caught.value.body["param"] == param


def test_stream_options_without_stream_is_refused(server: Server) -> None:
    with server.client() as http:
        body = {"model": "stts-demo", "messages": USER, "stream_options": {"include_usage": True}}
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


def test_max_tokens_unset_is_the_rest_of_the_context_up_to_the_server_bound(server: Server) -> None:
    body = {"model": "stts-demo", "messages": USER, "ignore_eos": True}
    with server.client() as http:
        usage = http.post("/v1/chat/completions", json=body).json()["usage"]
        assert usage["completion_tokens"] == DEFAULT_MAX_TOKENS
        near_the_end = {"messages": [{"role": "user", "content": "go " * 8143}]}
        usage = http.post("/v1/chat/completions", json=body | near_the_end).json()["usage"]
    assert usage["prompt_tokens"] == 8185  # 7 tokens before the 8192-token context's end
    assert usage["completion_tokens"] == 7


def test_unknown_fields_are_logged_and_ignored(server: Server) -> None:
    reply = server.openai().chat.completions.create(
        model="stts-demo",
        messages=USER,
        max_tokens=2,
        store=True,
        extra_body={"frobnicate": 1},
    )
    # the random model's two tokens may decode to nothing visible: check that they were generated
    assert reply.usage.completion_tokens == 2 and reply.choices[0].finish_reason == "length"
    assert "ignored unknown request fields: ['frobnicate', 'store']" in server.log.read_text()
