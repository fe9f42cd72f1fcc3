"""GET /v1/entities/{id} and GET /v1/entities/{id}/image."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from service.errors import EntityImageNotFound, EntityNotFound
from service.kg_images import KGImages
from service.schemas import EntityResponse, ErrorResponse
from service.state import AppState

router = APIRouter(prefix="/v1", tags=["entities"])


def _meta(request: Request, entity_id: str):
    state: AppState = request.app.state.el
    index = state.require_linker().index
    row = index.row_of.get(entity_id)
    if row is None:
        raise EntityNotFound(f"no entity with id {entity_id!r} in index {index.version}")
    return state, index.entities[row]


@router.get("/entities/{entity_id}", response_model=EntityResponse,
            responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def get_entity(entity_id: str, request: Request) -> EntityResponse:
    _, e = _meta(request, entity_id)
    return EntityResponse(id=e.id, name=e.name, description=e.description, has_image=e.has_image)


@router.get(
    "/entities/{entity_id}/image",
    response_class=Response,
    summary="The entity's KG image (JPEG, at most 320 px a side)",
    description="The image of the KG the index was built from, decoded by the rules of uploaded images and "
                "re-encoded as a JPEG thumbnail. 404 `entity_not_found` for an id not in the index, 404 "
                "`entity_image_not_found` when the KG has no image for it (`has_image` false) or none it may serve.",
    responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
               404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def get_entity_image(entity_id: str, request: Request) -> Response:
    state, e = _meta(request, entity_id)
    if not e.has_image:
        raise EntityImageNotFound(f"entity {entity_id!r} has no image in the KG")
    images = state.extras.get("kg_images")
    if images is None:
        images = state.extras.setdefault("kg_images", KGImages(state.settings))
    data = await asyncio.to_thread(images.thumbnail, entity_id)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
