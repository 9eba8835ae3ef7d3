"""One error shape for every failure: `{"error": {"message", "type", "param", "code"}}`.

A leaf: request handling anywhere raises `APIError`; `server.error_handlers` renders it (and
every other exception) in this shape."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

from server.schemas import ErrorBody, ErrorResponse

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
