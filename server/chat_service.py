"""Serving one chat completion: vLLM's own chat serving (see `server.vllm_compat`) behind our
checks, admission control, request deadline, one retry of a request the engine failed before
its first token, the `stts` report, metrics and client-disconnect aborts.

The route (`server.routes.chat`) only hands the request here (`ChatServiceDep`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse as VLLMErrorResponse
from vllm.exceptions import VLLMError
from vllm.v1.engine.exceptions import EngineDeadError

from server import metrics
from server.chat_request import ChatRequest, RequestContext
from server.errors import ENGINE_DEAD, APIError, error_body, error_code
from server.http_guard import STATUS_KEY
from server.schemas import STTSOptions, STTSReport
from server.state import AppState, StateDep, Ticket
from server.video_options import resolve_video_options
from server.vllm_compat import error_fields, sampling_error

logger = logging.getLogger(__name__)

_DONE = "data: [DONE]\n\n"

# What vLLM's serving may raise for a bad request (it maps them to 4xx/5xx the same way).
_VLLM_ERRORS = (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError)


def _from_vllm(exc: Exception) -> APIError:
    status, message, param = error_fields(exc)
    return APIError(status, message, param=param, code=error_code(status))


class _Timing:
    """TTFT and time per output token of one request, recorded into the metrics, and the
    request's deadline."""

    def __init__(self, timeout: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.first: float | None = None

    def first_token(self, ticket: Ticket, at: float) -> None:
        if self.first is None:
            self.first = at
            ticket.started()
            metrics.TIME_TO_FIRST_TOKEN.observe(at - self.start)

    def finish(self, completion_tokens: int) -> None:
        """Requests and their latency are counted by `server.http_guard`, once each."""
        end = time.monotonic()
        if self.first is not None and completion_tokens > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((end - self.first) / (completion_tokens - 1))


def _record_video_tokens(report: STTSReport | None) -> None:
    if report is None:
        return
    metrics.FRAMES_SAMPLED.inc(sum(v.frames_sampled for v in report.videos))
    metrics.VIDEO_TOKENS_BEFORE.inc(report.video_tokens_before)
    metrics.VIDEO_TOKENS_AFTER.inc(report.video_tokens_after)
    metrics.TOKENS_SAVED.inc(report.tokens_saved)


def _event_json(event: str) -> dict[str, Any] | None:
    if not event.startswith("data: {"):
        return None
    return json.loads(event[len("data: ") :])


def _error_event(event: str) -> APIError | None:
    data = _event_json(event)
    if data is None or "error" not in data:
        return None
    error = data["error"]
    status = int(error.get("code") or 500)
    return APIError(
        status, error.get("message", ""), param=error.get("param"), code=error_code(status)
    )


def _our_error_event(error: APIError, engine_dead: bool) -> str:
    """vLLM's mid-stream error event in this server's error shape."""
    if engine_dead:
        body = error_body(503, ENGINE_DEAD, code="engine_dead")
    else:
        body = error_body(error.status, error.message, param=error.param, code=error.code)
    return f"data: {body.model_dump_json()}\n\n"


class ChatService:
    """One request's way from its checks to its answer, over the app's shared state."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.settings = state.settings

    async def complete(
        self, body: ChatRequest, request: Request, owner: str
    ) -> JSONResponse | StreamingResponse:
        """vLLM's answer with our report; the admission ticket is released when the answer
        is complete (for a stream: when it ends, however it ends)."""
        options = self.check(body)
        body.set_context(RequestContext(owner=owner, video_options=options))
        if body.user:
            logger.info("chat completion for user %r", body.user)
        ticket = self.state.admission.acquire()
        timing = _Timing(self.settings.request_timeout_seconds)
        try:
            response = await self._respond(body, request, ticket, timing)
        except BaseException as exc:
            dead = isinstance(exc, EngineDeadError)
            error = _from_vllm(exc) if isinstance(exc, _VLLM_ERRORS) and not dead else exc
            ticket.release()
            timing.finish(0)
            if error is exc:
                raise
            raise error from exc
        if not isinstance(response, StreamingResponse):
            ticket.release()
        return response

    def check(self, body: ChatRequest) -> STTSOptions:
        """Everything refusable without work, before admission and media loading; the
        request's frame options, resolved from all their sources (once per request)."""
        name = self.settings.served_model_name
        if body.model is not None and body.model != name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {name!r}",
                param="model",
                code="model_not_found",
            )
        if body.model_extra:
            logger.info("ignored unknown request fields: %s", sorted(body.model_extra))
        options = resolve_video_options(body, self.settings.max_frames)
        if (exc := sampling_error(body, self.state.chat_serving)) is not None:
            raise _from_vllm(exc)
        return options

    def _deadline_error(self) -> APIError:
        limit = self.settings.request_timeout_seconds
        return APIError(
            504, f"request exceeded the server's {limit:g} s deadline", code="deadline_exceeded"
        )

    async def _until_disconnect(
        self, request: Request, work: asyncio.Future, deadline: float
    ) -> Any:
        """Awaits `work`, cancelling it (which aborts the engine request and stops media work)
        if the client leaves or the request's deadline passes."""
        while True:
            wait = min(0.5, max(0.0, deadline - time.monotonic()))
            done, _ = await asyncio.wait({work}, timeout=wait)
            if done:
                return work.result()
            if time.monotonic() >= deadline:
                work.cancel()
                raise self._deadline_error()
            if await request.is_disconnected():
                work.cancel()
                raise APIError(499, "client disconnected", code="client_closed_request")

    async def _respond(
        self, body: ChatRequest, request: Request, ticket: Ticket, timing: _Timing
    ) -> JSONResponse | StreamingResponse:
        """vLLM's answer with our report; a stream takes over the ticket and the timing.

        A request the engine ended with an error before any output (vLLM calls these
        retryable: e.g. its two multimodal caches drifted apart and the stale entries are now
        dropped) is served once more, media and all, before the client hears of it."""
        deadline = timing.deadline
        serving = self.state.chat_serving
        for attempt in (1, 2):
            work = asyncio.ensure_future(serving.create_chat_completion(body, request))
            result = await self._until_disconnect(request, work, deadline)
            first = None
            if isinstance(result, AsyncIterator):  # a stream: its first event decides
                first = await self._until_disconnect(
                    request, asyncio.ensure_future(anext(result)), deadline
                )
            failed = isinstance(result, VLLMErrorResponse) or (
                first is not None and _error_event(first) is not None
            )
            if not (attempt == 1 and failed and body.served.failed_before_output):
                break
            if first is not None:
                await result.aclose()
            logger.warning("the engine failed a request before its first token; serving it again")
            body.serve_again()
        if first is not None:
            return await self._respond_stream(body, result, first, ticket, timing, request)
        served = body.served
        if isinstance(result, VLLMErrorResponse):
            raise APIError(
                result.error.code,
                result.error.message,
                param=result.error.param,
                code=error_code(result.error.code),
            )
        if isinstance(result, ChatCompletionResponse):
            if served.decode_seconds is not None:  # non-streaming sees one, final output
                timing.first_token(ticket, time.monotonic() - served.decode_seconds)
            _record_video_tokens(served.stts)
            timing.finish(result.usage.completion_tokens)
            content = result.model_dump()
            if served.stts is not None:
                content["stts"] = served.stts.model_dump()
            return JSONResponse(content)
        raise TypeError(f"unexpected answer from vLLM's chat serving: {type(result).__name__}")

    async def _respond_stream(
        self,
        body: ChatRequest,
        result: AsyncIterator[str],
        first: str,
        ticket: Ticket,
        timing: _Timing,
        request: Request,
    ) -> StreamingResponse:
        if (error := _error_event(first)) is not None:
            await result.aclose()
            raise error  # nothing streamed yet: an HTTP error rather than a 200 with an error
        _record_video_tokens(body.served.stts)
        return StreamingResponse(
            self._stream(body, first, result, ticket, timing, request),
            media_type="text/event-stream",
        )

    async def _stream(
        self,
        body: ChatRequest,
        first: str,
        events: AsyncIterator[str],
        ticket: Ticket,
        timing: _Timing,
        request: Request,
    ) -> AsyncIterator[str]:
        """vLLM's SSE events, as they come, with the `stts` report added to the usage chunk
        and error events in our error shape; vLLM ends every stream, failed or not, with
        `[DONE]`. Leaving early aborts the engine request."""
        status = 200
        try:
            event: str | None = first
            while event is not None:
                if (at := body.served.first_token_at) is not None:
                    timing.first_token(ticket, at)
                data = _event_json(event)
                if data is not None and "error" in data:
                    error = _error_event(event)
                    assert error is not None
                    status = error.status
                    event = _our_error_event(error, self.state.engine.dead)
                elif data is not None and data.get("usage") and not data.get("choices"):
                    if body.served.stts is not None:
                        data["stts"] = body.served.stts.model_dump()
                    event = f"data: {json.dumps(data)}\n\n"
                yield event
                if event == _DONE:
                    break
                remaining = max(0.0, timing.deadline - time.monotonic())
                try:
                    event = await asyncio.wait_for(anext(events, None), remaining)
                except TimeoutError:
                    status = 504
                    yield _our_error_event(self._deadline_error(), False)
                    yield _DONE
                    break
        except (asyncio.CancelledError, GeneratorExit):
            status = 499
            raise
        finally:
            await events.aclose()
            ticket.release()
            timing.finish(body.served.completion_tokens)
            if status != 200:  # the 200 went out first: count the request as what it became
                setattr(request.state, STATUS_KEY, status)


def get_chat_service(state: StateDep) -> ChatService:
    return ChatService(state)


ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
