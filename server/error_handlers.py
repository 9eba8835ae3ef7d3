"""The app's exception handlers: every failure, ours, FastAPI's, Starlette's or vLLM's,
answered in the one error shape of `server.errors`."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.exceptions import VLLMError, VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError

from server.errors import ENGINE_DEAD, APIError, error_code, error_response
from server.vllm_compat import error_fields
from stts_vllm.media.errors import MediaError

logger = logging.getLogger(__name__)

_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The most specific pydantic error (deepest location) as a message and `param` path;
    union branch names (`str`, `list[...]`, vLLM's `ChatCompletion...Param` types) are left out
    of the path."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if any(e.get("type") == "json_invalid" for e in errors):
        return "request body is not valid JSON", None
    for error in errors:  # vLLM's validators name the parameter themselves
        raised = (error.get("ctx") or {}).get("error")
        if isinstance(raised, VLLMValidationError):
            return str(raised), raised.parameter
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    location = [
        str(p)
        for p in first.get("loc", ())
        if p != "body"
        and not (isinstance(p, str) and ("[" in p or p in _TYPE_NAMES or p[:1].isupper()))
    ]
    param = ".".join(location) or None
    where = f" at `{param}`" if param else ""
    return f"{first.get('msg', 'invalid request')}{where}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(
            exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers
        )

    @app.exception_handler(MediaError)
    async def media_error(_: Request, exc: MediaError) -> JSONResponse:
        return error_response(exc.status, exc.message, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(VLLMError)
    async def vllm_error(_: Request, exc: VLLMError) -> JSONResponse:
        """vLLM's request validators raise these (not pydantic errors) while the body is parsed;
        answered as vLLM's server answers them."""
        status, message, param = error_fields(exc)
        return error_response(status, message, param=param, code=error_code(status))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, ENGINE_DEAD, code="engine_dead")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error")
