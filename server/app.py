"""The FastAPI application: state, routers, error handlers, engine lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.chat_inputs import load_chat
from server.engine import EngineService
from server.error_handlers import install_error_handlers
from server.file_store import FileStore
from server.http_guard import RequestGuard
from server.media import MediaLoader
from server.routes import chat, files, service
from server.settings import Settings
from server.state import Admission, AppState
from server.vllm_compat import build_chat_serving

logger = logging.getLogger(__name__)


def create_app(settings: Settings, on_engine_death: Callable[[], None] | None = None) -> FastAPI:
    """`on_engine_death` stops the HTTP server (see `_watch_engine`)."""
    engine = EngineService(settings)
    store = FileStore(
        settings.files_dir,
        max_files=settings.max_files,
        max_bytes=settings.max_files_bytes,
        max_file_bytes=settings.max_video_bytes,
    )
    state = AppState(
        settings=settings,
        engine=engine,
        files=store,
        media=MediaLoader(settings, store, engine.facts.geometry),
        admission=Admission(settings.max_in_flight, settings.retry_after_seconds),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        state.chat = build_chat_serving(
            engine.engine, settings, lambda request: load_chat(request, state)
        )
        stop = on_engine_death if settings.exit_on_engine_death else None
        watchdog = asyncio.create_task(_watch_engine(engine, stop))
        try:
            yield
        finally:
            watchdog.cancel()
            await engine.stop()
            store.close()

    app = FastAPI(title="stts-vllm", version="0.1.0", lifespan=lifespan)
    app.state.stts = state
    install_error_handlers(app)
    app.add_middleware(RequestGuard, state=state)
    app.include_router(chat.router)
    app.include_router(files.router)
    app.include_router(service.router)
    return app


async def _watch_engine(engine: EngineService, stop: Callable[[], None] | None) -> None:
    """vLLM's engine process does not come back once it died (a crash in a forward pass, the
    OOM killer): requests get 503 from then on, and unless told otherwise the server stops
    itself (`stts-serve` then exits with status 1) so that Docker or Kubernetes starts a fresh
    one."""
    while not engine.dead:
        await asyncio.sleep(1.0)
    logger.error("the inference engine died (its error is logged above)")
    if stop is not None:
        stop()
