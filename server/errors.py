"""One error shape for every failure: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.exceptions import VLLMValidationError

from server.media_errors import MediaError
from server.schemas import ErrorBody, ErrorResponse

logger = logging.getLogger(__name__)

ENGINE_DEAD = (
    "the inference engine stopped after an internal error (see the server log); "
    "the server must be restarted"
)


class APIError(Exception):
    """Raised anywhere in request handling; rendered as an OpenAI-style error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_code(status: int) -> str:
    """Our `code` for an error vLLM reports only by HTTP status."""
    if status == 400:
        return "invalid_request"
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    return ErrorResponse(
        error=ErrorBody(message=message, type=_error_type(status), param=param, code=code)
    )


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(status, message, param=param, code=code)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


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

    from vllm.exceptions import VLLMError
    from vllm.v1.engine.exceptions import EngineDeadError

    @app.exception_handler(VLLMError)
    async def vllm_error(_: Request, exc: VLLMError) -> JSONResponse:
        """vLLM's request validators raise these (not pydantic errors) while the body is parsed;
        answered as vLLM's server answers them."""
        from server.vllm_compat import error_fields

        status, message, param = error_fields(exc)
        return error_response(status, message, param=param, code=error_code(status))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, ENGINE_DEAD, code="engine_dead")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error")
