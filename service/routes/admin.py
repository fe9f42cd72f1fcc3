"""POST /v1/admin/reload: swap to a verified index without a restart; POST /v1/admin/compact: fold the entity
change log into a fresh index folder (both need an API key when keys are set)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Body, Request

from service.reloading import reload_index
from service.schemas import CompactResponse, ErrorResponse, ReloadRequest, ReloadResponse
from service.state import AppState

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/reload", response_model=ReloadResponse,
             responses={code: {"model": ErrorResponse} for code in (401, 409, 422, 503)},
             summary="Load and verify an index folder, then swap to it atomically (the old one serves meanwhile)")
async def reload(request: Request, body: Annotated[ReloadRequest | None, Body()] = None) -> ReloadResponse:
    state: AppState = request.app.state.el
    folder = Path(body.index_dir) if body is not None and body.index_dir is not None else None
    return await reload_index(state, folder, everywhere=True)


@router.post("/compact", response_model=CompactResponse,
             responses={code: {"model": ErrorResponse} for code in (401, 409, 503)},
             summary="Fold the entity change log into a fresh index folder in the background and swap it in")
async def compact(request: Request, wait: bool = False) -> CompactResponse:
    """wait=true answers once the compacted index serves (state done), else at once (state started)."""
    state: AppState = request.app.state.el
    linker = state.require_linker()
    if state.reloading:
        from service.errors import Conflict

        raise Conflict("an index reload is running")
    version, changes = linker.index.version, linker.store.pending if linker.store is not None else 0
    thread = state.updater.start_compaction()
    if not wait:
        return CompactResponse(state="started", index_version=version, changes=changes)
    await anyio.to_thread.run_sync(thread.join)
    if state.updater.last_compaction_error:
        from service.errors import Conflict

        raise Conflict(f"compaction failed, still serving {version}: {state.updater.last_compaction_error}")
    return CompactResponse(state="done", index_version=state.require_linker().index.version, changes=changes)
