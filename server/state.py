"""Process-wide objects the routes share, and the dependencies that hand them out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server import metrics
from server.auth import OWNER_KEY
from server.engine import EngineService
from server.errors import ENGINE_DEAD, APIError
from server.file_store import FileStore
from server.media import MediaLoader
from server.settings import Settings
from server.vllm_compat import ChatServing


class Admission:
    """Bounds admitted requests; beyond the bound a request is refused at once with 429 and
    `Retry-After`, never queued without limit."""

    def __init__(self, limit: int, retry_after: int) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.active = 0

    def acquire(self) -> Ticket:
        if self.active >= self.limit:
            metrics.REJECTED.inc()
            raise APIError(
                429,
                f"server is at capacity ({self.limit} requests in flight); retry shortly",
                code="overloaded",
                headers={"Retry-After": str(self.retry_after)},
            )
        self.active += 1
        metrics.IN_FLIGHT.inc()
        metrics.QUEUED.inc()
        return Ticket(self)


@dataclass
class Ticket:
    """One admitted request; `release` is idempotent (streams release on any exit path)."""

    admission: Admission
    waiting: bool = True
    released: bool = field(default=False)

    def started(self) -> None:
        if self.waiting:
            self.waiting = False
            metrics.QUEUED.dec()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.started()
        self.admission.active -= 1
        metrics.IN_FLIGHT.dec()


@dataclass
class AppState:
    settings: Settings
    engine: EngineService
    files: FileStore
    media: MediaLoader
    admission: Admission
    chat: ChatServing | None = None  # vLLM's chat serving over the engine, once started
    draining: bool = False  # SIGTERM came: new API requests get 503, in-flight ones finish

    @property
    def chat_serving(self) -> ChatServing:
        """The chat serving; 503 in the moment between the engine's start and its serving."""
        if self.chat is None:
            raise _not_ready()
        return self.chat


def _not_ready() -> APIError:
    return APIError(503, "model is still loading", code="not_ready", headers={"Retry-After": "5"})


def get_state(request: Request) -> AppState:
    return request.app.state.stts


def require_api_key(request: Request) -> str:
    """The caller's file namespace, as `server.http_guard` authenticated it (before the body
    was read); 401 if the request did not pass the guard."""
    owner = request.scope.get("state", {}).get(OWNER_KEY)
    if owner is None:
        raise APIError(
            401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key"
        )
    return owner


def require_ready(request: Request) -> None:
    """Refuses work (before any video is decoded) while the engine loads or once it died."""
    if request.app.state.stts.engine.dead:
        raise APIError(503, ENGINE_DEAD, code="engine_dead")
    if not request.app.state.stts.engine.ready.is_set():
        raise _not_ready()


StateDep = Annotated[AppState, Depends(get_state)]
OwnerDep = Annotated[str, Depends(require_api_key)]
"""The authenticated caller's file namespace (`auth.SHARED_OWNER` unless `api_keys` is set)."""
