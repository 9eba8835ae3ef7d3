"""An engine output that ends with vLLM's retryable `finish_reason="error"` before any token
marks the request for one more attempt (`server.vllm_compat._observe`); one that failed after
tokens went out does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from vllm.outputs import CompletionOutput, RequestOutput

from server.chat_request import ChatRequest
from server.vllm_compat import _observe


def _output(tokens: list[int], finish: str | None, finished: bool) -> RequestOutput:
    choice = CompletionOutput(
        index=0,
        text="",
        token_ids=tokens,
        cumulative_logprob=None,
        logprobs=None,
        finish_reason=finish,
    )
    return RequestOutput(
        request_id="r",
        prompt="",
        prompt_token_ids=[1],
        prompt_logprobs=None,
        outputs=[choice],
        finished=finished,
    )


async def _drain(request: ChatRequest, outputs: list[RequestOutput]) -> None:
    async def source() -> AsyncIterator[Any]:
        for output in outputs:
            yield output

    async for _ in _observe(request, source()):
        pass


def _request() -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hi"}])


def test_error_before_any_token_is_retryable() -> None:
    request = _request()
    asyncio.run(_drain(request, [_output([], "error", True)]))
    assert request.served.failed_before_output
    request.serve_again()
    assert not request.served.failed_before_output


def test_error_after_tokens_is_not_retried() -> None:
    request = _request()
    asyncio.run(_drain(request, [_output([5, 6], None, False), _output([], "error", True)]))
    assert not request.served.failed_before_output


def test_normal_finish_is_not_retried() -> None:
    request = _request()
    asyncio.run(_drain(request, [_output([5], "length", True)]))
    assert not request.served.failed_before_output
