"""GET /v1/entities/{id} and GET /v1/entities/{id}/image; and changing the KG while serving: PUT and DELETE
/v1/entities/{id}, POST /v1/entities:batch (JSON list or JSONL). Changes go through service/updates.py."""

from __future__ import annotations

import asyncio
import json
import re
import time
from functools import partial

import anyio
from fastapi import APIRouter, Request, Response
from pydantic import TypeAdapter, ValidationError

from service.conversions import first_error
from service.errors import (
    EntityImageNotFound,
    EntityNotFound,
    InvalidInput,
    TooManyItems,
    UnsupportedMediaType,
)
from service.kg_images import KGImages
from service.pipeline.decode import base64_image_bytes, clean_text, decode_image
from service.routes.forms import parse_json_or_form
from service.schemas import (
    ENTITY_ID_PATTERN,
    EntityBatchDelete,
    EntityBatchItem,
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
from service.updates import PendingChange

router = APIRouter(prefix="/v1", tags=["entities"])

_ID = re.compile(ENTITY_ID_PATTERN)
_ITEM: TypeAdapter[EntityBatchItem] = TypeAdapter(EntityBatchItem)
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


def _check_id(entity_id: str) -> str:
    if not _ID.fullmatch(entity_id):
        raise InvalidInput("id: 1-256 characters, no whitespace, slash or control characters")
    return entity_id


def _decode(entity_id: str, req: EntityRequest | EntityBatchItem, settings: Settings,
            image_bytes: bytes | None = None) -> PendingChange:
    """The decode stage of one change: text rules as for /v1/link, the description's own cap, the image rules."""
    from kg_index.load import EntityMeta

    if isinstance(req, EntityBatchDelete):
        return PendingChange(entity_id, None)
    lim = settings.limits
    name = clean_text(req.name, field="name", max_chars=lim.max_text_chars, required=True)
    description = clean_text(req.description, field="description", max_chars=settings.updates.max_description_chars)
    if image_bytes is None and req.image:
        image_bytes = base64_image_bytes(req.image, max_bytes=lim.max_image_bytes)
    image = decode_image(image_bytes, lim, target_size=settings.encoder.image_size) if image_bytes else None
    meta = EntityMeta(entity_id, name, description, image is not None, req.start_year, req.end_year, changed=True)
    if req.start_year is None and req.end_year is None:  # as the loader does: years read from the description
        from kg_index.attributes import lifespan

        meta.start_year, meta.end_year = lifespan(None, None, description)
    return PendingChange(entity_id, meta, image)


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
    _check_id(entity_id)
    req, image_bytes = await _parse_put(request, state.settings)
    snap = await state.updater.submit(1, [lambda: _decode(entity_id, req, state.settings, image_bytes)])
    return EntityChangeResponse(id=entity_id, op="put", index_version=snap.version, entities=len(snap))


@router.delete("/entities/{entity_id}", response_model=EntityChangeResponse, responses=_CHANGE_ERRORS,
               summary="Remove an entity; no /v1/link answer from then on returns it")
async def delete_entity(entity_id: str, request: Request) -> EntityChangeResponse:
    state: AppState = request.app.state.el
    state.require_linker()
    _check_id(entity_id)
    snap = await state.updater.submit(1, [lambda: PendingChange(entity_id, None)])
    return EntityChangeResponse(id=entity_id, op="delete", index_version=snap.version, entities=len(snap))


_JSON_WS = " \t\n\r"
_DECODER = json.JSONDecoder()
YIELD_CHARS = 1 << 16  # JSON characters parsed between two hand-overs of the GIL (one photo item is ~1 MB)


def json_list_items(text: str) -> list[object] | None:
    """The items of a JSON list, parsed one at a time; None when the text is valid JSON but not a list. A body of
    32 photos is ~30 MB: one json.loads holds the GIL for ~50 ms, stalling every /v1/link in the process, while
    item by item (~1.5 ms each for a photo) the parser gives the GIL up between items."""
    n, i = len(text), 0
    while i < n and text[i] in _JSON_WS:
        i += 1
    if i == n or text[i] != "[":
        json.loads(text)  # raises for invalid JSON
        return None
    i += 1
    items: list[object] = []
    parsed = 0  # characters parsed since the GIL was last given up
    while True:
        while i < n and text[i] in _JSON_WS:
            i += 1
        if i < n and text[i] == "]" and not items:
            i += 1
            break
        start = i
        obj, i = _DECODER.raw_decode(text, i)  # raises ValueError (JSONDecodeError) where no value starts
        items.append(obj)
        parsed += i - start
        if parsed >= YIELD_CHARS:  # hand the GIL to waiting threads now, not after the 5 ms switch interval
            time.sleep(0)
            parsed = 0
        while i < n and text[i] in _JSON_WS:
            i += 1
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            i += 1
            break
        raise json.JSONDecodeError("expected ',' or ']'", text, i)
    while i < n and text[i] in _JSON_WS:
        i += 1
    if i != n:
        raise json.JSONDecodeError("extra data", text, i)
    return items


def _parse_batch(body: bytes, ctype: str, cap: int) -> list[EntityBatchItem]:
    if ctype == "application/json":
        try:
            raw = json_list_items(body.decode("utf-8-sig"))
        except ValueError as exc:
            raise InvalidInput(f"body: invalid JSON ({exc.__class__.__name__})") from None
        if raw is None:
            raise InvalidInput("body: send a JSON list of entity changes")
        lines = list(enumerate(raw, 1))
    elif ctype in ("application/x-ndjson", "application/jsonl", "application/x-jsonlines"):
        lines = []
        for n, line in enumerate(body.decode("utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    lines.append((n, json.loads(line)))
                except ValueError:
                    raise InvalidInput(f"line {n}: invalid JSON") from None
    else:
        raise UnsupportedMediaType("send application/json (a list) or application/x-ndjson (JSONL)")
    if not lines:
        raise InvalidInput("body: no entity changes")
    if len(lines) > cap:
        raise TooManyItems(f"at most {cap} changes per batch (got {len(lines)})")
    items = []
    for n, obj in lines:
        if n % 8 == 0:  # as in json_list_items: other threads get the GIL between items
            time.sleep(0)
        try:
            items.append(_ITEM.validate_python(obj))
        except ValidationError as exc:
            raise InvalidInput(f"item {n}: {first_error(exc)}") from None
        _check_id(items[-1].id)
    return items


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
    state.require_linker()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    items = await anyio.to_thread.run_sync(_parse_batch, body, ctype, state.settings.updates.max_batch_items)
    snap = await state.updater.submit(len(items), [partial(_decode, i.id, i, state.settings) for i in items])
    return EntityBatchResponse(applied=len(items), index_version=snap.version, entities=len(snap),
                               results=[EntityBatchResult(id=i.id, op=i.op) for i in items])
