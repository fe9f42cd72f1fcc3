"""GET /healthz (liveness), GET /readyz (readiness), GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.schemas import HealthResponse
from service.state import AppState

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    # Liveness never touches the model: it must answer while inference saturates the CPU.
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def readyz(request: Request) -> Response:
    state: AppState = request.app.state.el
    if state.draining:
        return JSONResponse(HealthResponse(status="draining").model_dump(), status_code=503)
    if not state.ready or state.linker is None:
        body = HealthResponse(status="failed" if state.load_error else "loading", detail=state.load_error)
        return JSONResponse(body.model_dump(), status_code=503)
    # detail: set only while an index built from another KG is served on purpose (EL_INDEX__ALLOW_SOURCE_MISMATCH).
    return JSONResponse(HealthResponse(status="ready", index_version=state.linker.index.version,
                                       model_version=state.linker.model_version,
                                       detail=state.linker.source_warning).model_dump())


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state: AppState = request.app.state.el
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
