"""GET /v1/entities/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.errors import EntityNotFound
from service.schemas import EntityResponse, ErrorResponse
from service.state import AppState

router = APIRouter(prefix="/v1", tags=["entities"])


@router.get("/entities/{entity_id}", response_model=EntityResponse,
            responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def get_entity(entity_id: str, request: Request) -> EntityResponse:
    state: AppState = request.app.state.el
    index = state.require_linker().index
    row = index.row_of.get(entity_id)
    if row is None:
        raise EntityNotFound(f"no entity with id {entity_id!r} in index {index.version}")
    e = index.entities[row]
    return EntityResponse(id=e.id, name=e.name, description=e.description, has_image=e.has_image)
