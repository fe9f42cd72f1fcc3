"""GET /v1/entities/{id} and GET /v1/entities/{id}/image; and changing the KG while serving: PUT and DELETE
/v1/entities/{id}, POST /v1/entities:batch (JSON list or JSONL). Changes go through service/updates.py."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Request, Response

from service.entity_decode import BATCH_TYPES, check_id, decode_change
from service.errors import (
    EntityImageNotFound,
    EntityNotFound,
    InvalidInput,
    UnsupportedMediaType,
)
from service.kg_images import KGImages
from service.routes.forms import parse_json_or_form
from service.schemas import (
    EntityBatchDelete,
    EntityBatchPut,
    EntityBatchResponse,
    EntityBatchResult,
    EntityChangeResponse,
    EntityRequest,
    EntityResponse,
    ErrorResponse,
    inline_schema,
)
from service.settings import Settings
from service.state import AppState
from service.updates import PendingChange, pending_change

router = APIRouter(prefix="/v1", tags=["entities"])

_CHANGE_ERRORS = {code: {"model": ErrorResponse} for code in (404, 409, 413, 415, 422, 429, 503)}
_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"}, "description": {"type": "string"},
        "start_year": {"type": "integer", "minimum": -10_000, "maximum": 10_000},
        "end_year": {"type": "integer", "minimum": -10_000, "maximum": 10_000},
        "image": {"type": "string", "format": "binary"},
    },
}


async def _meta(request: Request, entity_id: str):
    state: AppState = request.app.state.el
    linker = state.require_linker()
    await asyncio.to_thread(linker.sync)  # what other server processes changed (off the loop: a swap loads a folder)
    index = linker.index
    row = index.row_of.get(entity_id)
    if row is None:
        raise EntityNotFound(f"no entity with id {entity_id!r} in index {index.version}")
    return state, index.entities[row]


@router.get("/entities/{entity_id}", response_model=EntityResponse,
            responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def get_entity(entity_id: str, request: Request) -> EntityResponse:
    _, e = await _meta(request, entity_id)
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
    state, e = await _meta(request, entity_id)
    if not e.has_image:
        raise EntityImageNotFound(f"entity {entity_id!r} has no image in the KG")
    if e.changed:
        # Put through the API (before or after a compaction): the KG file's image (if any) is not this entity's,
        # and the change log keeps the new image's features, not the image.
        raise EntityImageNotFound(f"entity {entity_id!r} was changed through the API: only its image's features "
                                  "are kept")
    images = state.extras.get("kg_images")
    if images is None:
        images = state.extras.setdefault("kg_images", KGImages(state.settings))
    data = await asyncio.to_thread(images.thumbnail, entity_id)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


def _years(fields: dict[str, object]) -> None:
    for year in ("start_year", "end_year"):  # form fields are text; the JSON body's years must be integers
        if isinstance(text := fields.get(year), str):
            try:
                fields[year] = int(text.strip())
            except ValueError:
                raise InvalidInput(f"{year}: an integer year") from None


async def _parse_put(request: Request, settings: Settings) -> tuple[EntityRequest, bytes | None]:
    return await parse_json_or_form(request, settings, EntityRequest, ("name", "description", "start_year", "end_year"),
                                    coerce=_years)


@router.put(
    "/entities/{entity_id}", response_model=EntityChangeResponse, responses=_CHANGE_ERRORS,
    summary="Create or replace an entity (JSON, or multipart with an image file part); live from the answer on",
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(EntityRequest)},
        "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
    }}},
)
async def put_entity(entity_id: str, request: Request) -> EntityChangeResponse:
    state: AppState = request.app.state.el
    state.require_linker()
    check_id(entity_id)
    req, image_bytes = await _parse_put(request, state.settings)
    snap = await state.updater.submit(
        1, [lambda: pending_change(decode_change(entity_id, req, state.settings, image_bytes))])
    return EntityChangeResponse(id=entity_id, op="put", index_version=snap.version, entities=len(snap))


@router.delete("/entities/{entity_id}", response_model=EntityChangeResponse, responses=_CHANGE_ERRORS,
               summary="Remove an entity; no /v1/link answer from then on returns it")
async def delete_entity(entity_id: str, request: Request) -> EntityChangeResponse:
    state: AppState = request.app.state.el
    state.require_linker()
    check_id(entity_id)
    snap = await state.updater.submit(1, [lambda: PendingChange(entity_id, None)])
    return EntityChangeResponse(id=entity_id, op="delete", index_version=snap.version, entities=len(snap))


@router.post(
    "/entities:batch", response_model=EntityBatchResponse, responses=_CHANGE_ERRORS,
    summary="Put or delete many entities in one call, all or nothing, in order (JSON list or JSONL)",
    openapi_extra={"requestBody": {
        "required": True,
        "description": "A JSON list of changes, or the same as JSONL (one change per line) with content type "
                       "application/x-ndjson, application/jsonl or application/x-jsonlines.",
        "content": {"application/json": {"schema": {"type": "array", "minItems": 1, "items": {
            "anyOf": [inline_schema(EntityBatchPut), inline_schema(EntityBatchDelete)]}}}}}},
)
async def batch_entities(request: Request) -> EntityBatchResponse:
    state: AppState = request.app.state.el
    state.updater.require_live()  # before the body is read: a server that takes no changes decodes nothing
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in BATCH_TYPES:
        raise UnsupportedMediaType("send application/json (a list) or application/x-ndjson (JSONL)")
    async with spooled_body(request) as path:
        batch = await state.entity_decoding.open(path, ctype)  # a child process parses and decodes
        try:
            snap = await state.updater.submit(len(batch.ops), [lambda d=d: pending_change(d()) for d in batch.decoders])
        finally:
            batch.close()
    return EntityBatchResponse(applied=len(batch.ops), index_version=snap.version, entities=len(snap),
                               results=[EntityBatchResult(id=i, op=op) for i, op in batch.ops])


@asynccontextmanager
async def spooled_body(request: Request) -> AsyncIterator[Path]:
    """The request body streamed to a temporary file, chunk by chunk as it arrives (never joined into one 30 MB
    bytes object on the event loop); removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="el-entities-", suffix=".body")
    try:
        try:
            async for chunk in request.stream():  # a local file's page cache: each write is short
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        yield Path(name)
    finally:
        os.unlink(name)
