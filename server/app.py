"""The FastAPI application: state, routers, error handlers, engine lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.engine import EngineService
from server.errors import install_error_handlers
from server.file_store import FileStore
from server.media import MediaLoader
from server.routes import chat, files, service
from server.settings import Settings
from server.state import Admission, AppState

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
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
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="stts-vllm", version="0.1.0", lifespan=lifespan)
    app.state.stts = state
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(files.router)
    app.include_router(service.router)
    return app
