"""`POST /v1/chat/completions`: authenticated, refused while the engine is not ready, then
served by `server.chat_service` (checks, admission, vLLM's chat serving, the `stts` report)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from server.chat_request import ChatRequest
from server.chat_service import ChatServiceDep
from server.http_guard import CHAT_ROUTE
from server.state import OwnerDep, require_api_key, require_ready

router = APIRouter(dependencies=[Depends(require_api_key), Depends(require_ready)])


@router.post(CHAT_ROUTE)
async def chat_completions(
    body: ChatRequest, request: Request, service: ChatServiceDep, owner: OwnerDep
) -> Response:
    return await service.complete(body, request, owner)
