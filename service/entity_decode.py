"""Entity changes from request bodies to decoded values: the JSON list or JSONL of POST /v1/entities:batch, and one
change's text and image rules (those of /v1/link). Light imports only (no torch, FAISS or web framework): the batch
decoding process (service/decode_process.py) imports this module, and starts faster for it."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from PIL import Image
from pydantic import TypeAdapter, ValidationError

from kg_index.attributes import lifespan
from service.conversions import first_error
from service.errors import InvalidInput, TooManyItems, UnsupportedMediaType
from service.pipeline.decode import base64_image_bytes, clean_text, decode_image
from service.schemas import ENTITY_ID_PATTERN, EntityBatchDelete, EntityBatchItem, EntityRequest
from service.settings import Settings

JSON_TYPES = ("application/json",)
JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")
BATCH_TYPES = JSON_TYPES + JSONL_TYPES

_ID = re.compile(ENTITY_ID_PATTERN)
_ITEM: TypeAdapter[EntityBatchItem] = TypeAdapter(EntityBatchItem)
_JSON_WS = " \t\n\r"
_DECODER = json.JSONDecoder()
YIELD_CHARS = 1 << 16  # JSON characters parsed between two hand-overs of the GIL (one photo item is ~1 MB)


@dataclass
class DecodedChange:
    """One change, decoded: for a put its checked text, years and image (None without one); for a delete only
    the id (name None)."""

    id: str
    name: str | None = None
    description: str = ""
    start_year: int | None = None
    end_year: int | None = None
    image: Image.Image | None = None

    @property
    def op(self) -> str:
        return "delete" if self.name is None else "put"


def check_id(entity_id: str) -> str:
    if not _ID.fullmatch(entity_id):
        raise InvalidInput("id: 1-256 characters, no whitespace, slash or control characters")
    return entity_id


def decode_change(entity_id: str, req: EntityRequest | EntityBatchItem, settings: Settings,
                  image_bytes: bytes | None = None) -> DecodedChange:
    """The decode stage of one change: text rules as for /v1/link, the description's own cap, the image rules."""
    if isinstance(req, EntityBatchDelete):
        return DecodedChange(entity_id)
    lim = settings.limits
    name = clean_text(req.name, field="name", max_chars=lim.max_text_chars, required=True)
    description = clean_text(req.description, field="description", max_chars=settings.updates.max_description_chars)
    if image_bytes is None and req.image:
        image_bytes = base64_image_bytes(req.image, max_bytes=lim.max_image_bytes)
    image = decode_image(image_bytes, lim, target_size=settings.encoder.image_size) if image_bytes else None
    start, end = req.start_year, req.end_year
    if start is None and end is None:  # as the loader does: years read from the description
        start, end = lifespan(None, None, description)
    return DecodedChange(entity_id, name, description, start, end, image)


def json_list_items(text: str) -> list[object] | None:
    """The items of a JSON list, parsed one at a time; None when the text is valid JSON but not a list. A body of
    32 photos is ~30 MB: one json.loads holds the GIL for ~50 ms, stalling every other thread of the process,
    while item by item (~1.5 ms each for a photo) the parser gives the GIL up between items."""
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


def parse_batch(body: bytes, ctype: str, cap: int) -> list[EntityBatchItem]:
    """The validated changes of a POST /v1/entities:batch body (a JSON list, or JSONL), in order."""
    if ctype in JSON_TYPES:
        try:
            raw = json_list_items(body.decode("utf-8-sig"))
        except ValueError as exc:
            raise InvalidInput(f"body: invalid JSON ({exc.__class__.__name__})") from None
        if raw is None:
            raise InvalidInput("body: send a JSON list of entity changes")
        lines = list(enumerate(raw, 1))
    elif ctype in JSONL_TYPES:
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
        check_id(items[-1].id)
    return items
