"""Service routes: models, liveness, readiness, metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from server import metrics
from server.schemas import Health, ModelCard, ModelList
from server.state import StateDep, require_api_key

router = APIRouter()
_STARTED = int(time.time())


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
async def list_models(state: StateDep) -> ModelList:
    return ModelList(data=[ModelCard(id=state.settings.served_model_name, created=_STARTED)])


@router.get("/health", response_model=Health)
async def health(state: StateDep) -> JSONResponse:
    """Liveness: the process answers (the model may still be loading) and its engine is not
    dead; a liveness probe that fails restarts the container."""
    if state.engine.dead:
        return JSONResponse(Health(status="engine_dead").model_dump(), status_code=503)
    return JSONResponse(Health(status="ok").model_dump())


@router.get("/ready", response_model=Health)
async def ready(state: StateDep) -> JSONResponse:
    """Readiness: the engine is loaded and accepting requests (not while draining, so a load
    balancer stops sending new ones)."""
    if state.engine.dead:
        return JSONResponse(Health(status="engine_dead").model_dump(), status_code=503)
    if state.draining:
        return JSONResponse(Health(status="draining").model_dump(), status_code=503)
    if state.engine.ready.is_set():
        return JSONResponse(Health(status="ok").model_dump())
    return JSONResponse(Health(status="starting").model_dump(), status_code=503)


@router.get("/metrics")
async def prometheus_metrics(state: StateDep) -> Response:
    """Ours (`stts_*`) and vLLM's (`vllm:*`), one registry; the pruned tower's counters are
    fetched from the engine first."""
    values = await state.engine.encoder_calls()
    if values is not None:
        metrics.ENCODER.values = values
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
