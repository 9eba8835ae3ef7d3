"""The door every API request passes before any of its work starts: a pure ASGI middleware.

In order: refuse while draining (503), authenticate from the headers alone (401), bound the
body as it streams in (413, from `Content-Length` at once, else at the first byte over), and
count the request once in `stts_requests_total` with the status the client really got. FastAPI
reads and parses a body before it runs a route's dependencies, so none of this can live in
dependencies without first buffering what it is meant to refuse.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server import metrics
from server.auth import OWNER_KEY, authenticate
from server.errors import error_body
from server.state import AppState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FILES_ROUTE = "/v1/files"
CHAT_ROUTE = "/v1/chat/completions"
MULTIPART_OVERHEAD = 1024 * 1024
"""Room for a multipart upload's headers and form fields on top of the file's own bytes."""

STATUS_KEY = "stts_status"
"""`scope["state"][STATUS_KEY]`: a route's final status when it differs from the HTTP one
(a stream that failed or lost its client after its 200 went out)."""


def route_label(path: str) -> str | None:
    """The `route` label of a counted API path; None for paths that are not counted (probes,
    metrics, unknown URLs: their cardinality is the client's to choose)."""
    if path == CHAT_ROUTE:
        return CHAT_ROUTE
    if path == FILES_ROUTE or path.startswith(FILES_ROUTE + "/"):
        return FILES_ROUTE
    return None


class BodyTooLarge(Exception):
    pass


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def _send_error(
    send: Send, status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> None:
    body = error_body(status, message, code=code).model_dump_json().encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestGuard:
    """Wraps the FastAPI app; reads the app's settings and draining flag."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    def _body_limit(self, path: str) -> int:
        settings = self.state.settings
        if route_label(path) == FILES_ROUTE:
            return settings.max_video_bytes + MULTIPART_OVERHEAD
        return settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        label = route_label(scope["path"])
        start = time.monotonic()
        sent: dict[str, int] = {}
        counted = False

        def count() -> None:
            nonlocal counted
            if label is None or counted:
                return
            counted = True
            state = scope.get("state") or {}
            status = state.get(STATUS_KEY) or sent.get("status") or 499  # no answer: it left
            metrics.REQUESTS.labels(route=label, status=str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route=label).observe(time.monotonic() - start)

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                count()  # before the last byte leaves: a client that saw it sees it counted
            await send(message)

        try:
            await self._guarded(scope, receive, counted_send)
        finally:
            count()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.state.settings
        if self.state.draining:
            await _send_error(
                send,
                503,
                "server is shutting down; retry on another replica",
                "shutting_down",
                {"Retry-After": "1", "Connection": "close"},
            )
            return
        headers = _headers(scope)
        owner = authenticate(settings, headers.get("authorization"))
        if owner is None:
            await _send_error(
                send,
                401,
                "missing or invalid API key (Authorization: Bearer <key>)",
                "invalid_api_key",
            )
            return
        scope.setdefault("state", {})[OWNER_KEY] = owner  # routes read it (`OwnerDep`)
        limit = self._body_limit(scope["path"])
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, 413, _too_large(limit), "request_too_large")
            return
        await self._bounded(scope, receive, send, limit)

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """The body counted as it arrives; past `limit` reading stops and, whatever the app
        made of the cut body, the client gets the 413."""
        received = 0
        over = False
        started = False

        async def bounded_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge
            return message

        async def bounded_send(message: Message) -> None:
            nonlocal started
            if over:
                if not started:
                    started = True
                    await _send_error(send, 413, _too_large(limit), "request_too_large")
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, bounded_send)
        except BodyTooLarge:
            if not started:
                await _send_error(send, 413, _too_large(limit), "request_too_large")
                return
            raise


def _too_large(limit: int) -> str:
    return f"request body exceeds the {limit} byte limit"
