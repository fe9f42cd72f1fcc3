"""POST /v1/admin/reload: swap to a verified index without a restart (needs an API key when keys are set)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Request

from service.reloading import reload_index
from service.schemas import ErrorResponse, ReloadRequest, ReloadResponse
from service.state import AppState

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/reload", response_model=ReloadResponse,
             responses={code: {"model": ErrorResponse} for code in (401, 409, 422, 503)},
             summary="Load and verify an index folder, then swap to it atomically (the old one serves meanwhile)")
async def reload(request: Request, body: Annotated[ReloadRequest | None, Body()] = None) -> ReloadResponse:
    state: AppState = request.app.state.el
    folder = Path(body.index_dir) if body is not None and body.index_dir is not None else None
    return await reload_index(state, folder)
