"""`stts-serve`: the server's entry point (flags or `STTS_*` environment variables)."""

from __future__ import annotations

import logging
import os
import sys
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic_settings import CliApp

from server.settings import Settings

if TYPE_CHECKING:
    from server.state import AppState


class _DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown (stop listening, let in-flight requests finish within
    `drain_seconds`), plus: requests that still arrive on open connections get 503 at once."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.state.draining:
            logging.getLogger(__name__).info(
                "draining: new requests get 503, in-flight ones have %.0f s",
                self.state.settings.drain_seconds,
            )
        self.state.draining = True
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = CliApp.run(Settings, cli_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (settings.model / "config.json").exists():
        raise SystemExit(f"no checkpoint at {settings.model} (make one: stts-vllm make-demo DIR)")
    if settings.enable_auto_tool_choice and not settings.tool_call_parser:
        raise SystemExit("--enable-auto-tool-choice requires --tool-call-parser (as in vLLM)")
    if settings.tool_call_parser:
        from vllm.tool_parsers import ToolParserManager

        known = ToolParserManager.list_registered()
        if settings.tool_call_parser not in known:
            raise SystemExit(f"--tool-call-parser {settings.tool_call_parser!r}: one of {known}")
    from server.app import create_app
    from server.engine import EngineService

    try:
        EngineService(settings).engine_args()
    except ValueError as error:
        raise SystemExit(str(error)) from None

    def stop() -> None:  # uvicorn's graceful shutdown, without a signal it would re-raise
        server.should_exit = True

    app = create_app(settings, on_engine_death=stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=max(1, round(settings.drain_seconds)),
    )
    server = _DrainingServer(config, app.state.stts)
    # Bound before the engine starts (uvicorn would bind after the app's start-up): a taken
    # port fails at once instead of after the model loads, and no port the engine's own
    # processes pick while starting can take ours.
    try:
        socket = config.bind_socket()
    except SystemExit:  # uvicorn has logged why (e.g. "Address already in use")
        raise SystemExit(f"stts-serve: cannot listen on {settings.host}:{settings.port}") from None
    server.run(sockets=[socket])
    if app.state.stts.engine.dead:
        raise SystemExit("stts-serve: the inference engine died; exiting so it can be restarted")


if __name__ == "__main__":
    main()
