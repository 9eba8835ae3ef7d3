"""The request types of `POST /v1/chat/completions`.

The body is vLLM's own `ChatCompletionRequest`, so the field set, the ranges, the defaults, the
validators and `to_sampling_params` are vLLM's and follow it when it changes; plus our `stts`
extension, and refusals (400 naming the field) of what this server cannot honour, where vLLM
would accept and silently drop it. Unknown fields are accepted and ignored, as vLLM does; the
route logs their names.

The request object is the one value vLLM's serving code hands through every step (render,
generate, format), so it also carries what the route decided before serving it
(`RequestContext`) and what serving it taught the server (`ServedFacts`). `LoadedChat` is the
request once its media are loaded: what our renderer hands to vLLM's.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import PrivateAttr, model_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.exceptions import VLLMValidationError

from server.auth import SHARED_OWNER
from server.schemas import STTSOptions, STTSReport

# OpenAI's documented range; vLLM clamps instead of refusing.
LOGIT_BIAS_RANGE = (-100.0, 100.0)

# vLLM's message types take one URL string per video part: our frame-list videos
# (`"video_url": {"url": [frame URLs]}`) travel through them as one string in this scheme.
FRAME_LIST_SCHEME = "stts-frames:"

# Content part types that carry text, and the key of their text, as vLLM's parser reads them.
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


def _frame_lists_as_strings(messages: Any) -> Any:
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts = []
            for part in content:
                video = part.get("video_url") if isinstance(part, dict) else None
                if isinstance(video, dict) and isinstance(video.get("url"), list):
                    url = FRAME_LIST_SCHEME + json.dumps(video["url"])
                    part = {**part, "video_url": {**video, "url": url}}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


def _refuse(message: str, parameter: str) -> VLLMValidationError:
    return VLLMValidationError(message, parameter=parameter)


@dataclass(frozen=True)
class RequestContext:
    """What the route decided about a request before serving it, for the media loader."""

    owner: str = SHARED_OWNER  # whose uploaded files the request may use
    video_options: STTSOptions = field(default_factory=STTSOptions)  # all sources, resolved once


@dataclass
class ServedFacts:
    """What serving one request taught the server, for the route to report."""

    stts: STTSReport | None = None
    first_token_at: float | None = None
    decode_seconds: float | None = None
    completion_tokens: int = 0
    failed_before_output: bool = False  # the engine ended it with an error, no token out


@dataclass
class LoadedChat:
    """A request's messages in vLLM's conversation format (media as `{"type": "image" |
    "video"}` placeholders for the chat template), the media the engine needs, and the report of
    what STTS did."""

    conversation: list[dict[str, Any]]
    multi_modal_data: dict[str, Any]
    mm_processor_kwargs: dict[str, Any]
    report: STTSReport | None


class ChatRequest(ChatCompletionRequest):
    stts: STTSOptions | None = None

    _context: RequestContext | None = PrivateAttr(default=None)
    _served: ServedFacts = PrivateAttr(default_factory=ServedFacts)

    @property
    def context(self) -> RequestContext:
        if self._context is None:
            raise RuntimeError("a chat request is served only after the route set its context")
        return self._context

    def set_context(self, context: RequestContext) -> None:
        self._context = context

    @property
    def served(self) -> ServedFacts:
        return self._served

    def serve_again(self) -> None:
        """Fresh facts for a second attempt (the context stays)."""
        self._served = ServedFacts()

    @model_validator(mode="before")
    @classmethod
    def refuse_what_cannot_be_honoured(cls, data: Any) -> Any:
        """Fields that would change what the client gets back but that this server cannot do:
        answered with a 400 instead of a 200 that quietly lacks them."""
        if not isinstance(data, dict):
            return data
        if not data.get("messages"):
            # OpenAI requires at least one message; an empty chat renders only the template's
            # system preamble, which is never what a client meant.
            raise _refuse("`messages` must hold at least one message.", "messages")
        data = {**data, "messages": _frame_lists_as_strings(data["messages"])}
        if data.get("audio") is not None:
            raise _refuse("audio output is not supported: this server answers in text", "audio")
        modalities = data.get("modalities")
        if modalities is not None and list(modalities) != ["text"]:
            raise _refuse(
                f"modalities {modalities!r} are not supported: only ['text']", "modalities"
            )
        if data.get("functions") is not None or data.get("function_call") not in (None, "none"):
            parameter = "functions" if data.get("functions") is not None else "function_call"
            raise _refuse(
                "the deprecated `functions` / `function_call` are not supported; use `tools` "
                "and `tool_choice`",
                parameter,
            )
        if data.get("web_search_options") is not None:
            raise _refuse("web search is not supported", "web_search_options")
        low, high = LOGIT_BIAS_RANGE
        for token, bias in (data.get("logit_bias") or {}).items():
            if isinstance(bias, int | float) and not low <= bias <= high:
                raise _refuse(
                    f"logit_bias[{token!r}] = {bias} is outside [{low:g}, {high:g}]",
                    "logit_bias",
                )
        return data


LoadChat = Callable[[ChatRequest], Awaitable[LoadedChat]]
"""Loads a request's media (`server.chat_inputs.load_chat`, bound to the app's state)."""
