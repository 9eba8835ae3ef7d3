"""The one exception media handling raises: a stable `code` and a client-facing message."""

from __future__ import annotations


class MediaError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
