"""`POST /v1/chat/completions`: validate, load media, run the engine, stream or return."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server import metrics
from server.chat_inputs import EngineInputs, build_engine_inputs
from server.errors import ENGINE_DEAD, APIError
from server.schemas import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorResponse,
    Usage,
)
from server.state import StateDep, Ticket, require_api_key, require_ready

router = APIRouter(dependencies=[Depends(require_api_key), Depends(require_ready)])
ROUTE = "/v1/chat/completions"
DEFAULT_MAX_TOKENS = 256


def _sampling_params(body: ChatCompletionRequest) -> Any:
    """Always delta outputs: a non-streaming request accumulates them, so the time to its
    first token is measured like a streaming one's."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    try:
        return SamplingParams(
            n=body.n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=stop,
            top_k=-1 if body.top_k is None else body.top_k,
            min_tokens=body.min_tokens or 0,
            ignore_eos=body.ignore_eos,
            max_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
            output_kind=RequestOutputKind.DELTA,
        )
    except (ValueError, VLLMClientError) as exc:
        raise APIError(400, str(exc), code="invalid_request") from exc


class _Timing:
    """TTFT and time per output token of one request, recorded into the metrics."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.first: float | None = None

    def token(self, ticket: Ticket) -> None:
        if self.first is None:
            self.first = time.monotonic()
            ticket.started()
            metrics.TIME_TO_FIRST_TOKEN.observe(self.first - self.start)

    def finish(self, completion_tokens: int, status: int) -> None:
        end = time.monotonic()
        if self.first is not None and completion_tokens > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((end - self.first) / (completion_tokens - 1))
        metrics.REQUEST_SECONDS.labels(route=ROUTE).observe(end - self.start)
        metrics.REQUESTS.labels(route=ROUTE, status=str(status)).inc()


def _record_video_tokens(inputs: EngineInputs) -> None:
    if inputs.report is None:
        return
    metrics.FRAMES_SAMPLED.inc(sum(v.frames_sampled for v in inputs.report.videos))
    metrics.VIDEO_TOKENS_BEFORE.inc(inputs.report.video_tokens_before)
    metrics.VIDEO_TOKENS_AFTER.inc(inputs.report.video_tokens_after)
    metrics.TOKENS_SAVED.inc(inputs.report.tokens_saved)


@dataclass
class _Completion:
    """Delta outputs of one request, accumulated per choice."""

    prompt_tokens: int = 0
    texts: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)

    def add(self, output: Any) -> None:
        self.prompt_tokens = len(output.prompt_token_ids or []) or self.prompt_tokens
        for c in output.outputs:
            self.texts[c.index] = self.texts.get(c.index, "") + c.text
            self.tokens[c.index] = self.tokens.get(c.index, 0) + len(c.token_ids)
            self.finish[c.index] = c.finish_reason

    def usage(self) -> Usage:
        completion = sum(self.tokens.values())
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )


async def _first(stream: AsyncIterator[Any]) -> Any:
    """The engine's first output; request errors it raises become 400s, not broken streams."""
    from vllm.exceptions import VLLMClientError

    try:
        return await anext(stream)
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise APIError(
            400, f"the engine refused the request: {exc}", code="engine_rejected"
        ) from exc


async def _until_disconnect(request: Request, work: asyncio.Task) -> Any:
    """Awaits `work`, cancelling it (which aborts the engine request) if the client leaves."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=0.5)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            raise APIError(499, "client disconnected", code="client_closed_request")


@router.post(ROUTE, response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep) -> Any:
    if body.model != state.settings.served_model_name:
        raise APIError(
            404,
            f"model {body.model!r} does not exist; this server serves "
            f"{state.settings.served_model_name!r}",
            param="model",
            code="model_not_found",
        )
    ticket = state.admission.acquire()
    timing = _Timing()
    streaming = False
    try:
        inputs = await build_engine_inputs(body, state)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        params = _sampling_params(body)
        outputs = state.engine.generate(inputs.prompt, params, request_id)
        if body.stream:
            first = await _first(outputs)  # engine refusals become 400s, not broken streams
            _record_video_tokens(inputs)
            streaming = True  # from here the stream owns the ticket and the timing
            stream = _stream(body, inputs, request_id, first, outputs, ticket, timing)
            return StreamingResponse(stream, media_type="text/event-stream")
        work = asyncio.ensure_future(_collect(outputs, ticket, timing))
        completion = await _until_disconnect(request, work)
        _record_video_tokens(inputs)
    except BaseException as exc:
        if not streaming:
            timing.finish(0, exc.status if isinstance(exc, APIError) else 500)
        raise
    finally:
        if not streaming:
            ticket.release()
    usage = completion.usage()
    timing.finish(usage.completion_tokens, 200)
    return ChatCompletionResponse(
        id=request_id,
        created=int(time.time()),
        model=body.model,
        usage=usage,
        stts=inputs.report,
        choices=[
            Choice(
                index=i,
                message=AssistantMessage(content=completion.texts[i]),
                finish_reason=completion.finish[i],
            )
            for i in sorted(completion.texts)
        ],
    )


async def _collect(outputs: AsyncIterator[Any], ticket: Ticket, timing: _Timing) -> _Completion:
    completion = _Completion()
    output = await _first(outputs)
    while output is not None:
        if any(c.token_ids for c in output.outputs):
            timing.token(ticket)
        completion.add(output)
        output = await anext(outputs, None)
    return completion


def _sse(chunk: ChatCompletionChunk) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


async def _stream(
    body: ChatCompletionRequest,
    inputs: EngineInputs,
    request_id: str,
    first: Any,
    outputs: AsyncIterator[Any],
    ticket: Ticket,
    timing: _Timing,
) -> AsyncIterator[str]:
    """SSE chunks: a role chunk per choice, content deltas, finish reasons, an optional usage
    chunk (with the `stts` report), then `[DONE]`. Leaving early aborts the engine request."""
    created = int(time.time())

    def chunk(choices: list[ChunkChoice], **extra: Any) -> str:
        return _sse(
            ChatCompletionChunk(
                id=request_id, created=created, model=body.model, choices=choices, **extra
            )
        )

    completion = _Completion()
    status = 200
    try:
        yield chunk(
            [ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(body.n)]
        )
        output = first
        while output is not None:
            completion.add(output)
            if any(c.token_ids for c in output.outputs):
                timing.token(ticket)
            deltas = [
                ChunkChoice(
                    index=c.index,
                    delta=Delta(content=c.text or None),
                    finish_reason=c.finish_reason,
                )
                for c in output.outputs
                if c.text or c.finish_reason
            ]
            if deltas:
                yield chunk(deltas)
            output = await anext(outputs, None)
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=completion.usage(), stts=inputs.report)
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = 499
        raise
    except Exception as exc:
        from vllm.v1.engine.exceptions import EngineDeadError

        status = 500
        dead = isinstance(exc, EngineDeadError)
        error = ErrorBody(
            message=ENGINE_DEAD if dead else f"generation failed: {type(exc).__name__}",
            type="server_error",
            code="engine_dead" if dead else "internal_error",
        )
        yield f"data: {ErrorResponse(error=error).model_dump_json()}\n\n"
    finally:
        await outputs.aclose()
        ticket.release()
        timing.finish(completion.usage().completion_tokens, status)
