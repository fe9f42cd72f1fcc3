"""One body parser for the routes that take JSON or multipart with an image file part (/v1/link, PUT /v1/entities):
the same content types, part caps, image byte cap and unknown-field rule for both."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from service.conversions import first_error
from service.errors import ImageTooLarge, InvalidInput, UnsupportedMediaType
from service.settings import Settings

M = TypeVar("M", bound=BaseModel)


async def parse_json_or_form(request: Request, settings: Settings, model: type[M], fields: tuple[str, ...],
                             coerce: Callable[[dict[str, object]], None] | None = None) -> tuple[M, bytes | None]:
    """(the validated body, the image file part's bytes or None). JSON: the model validates the body as is.
    Multipart: text fields `fields` plus `image` (a file part, or base64 text as in JSON); any other field is a 422
    as JSON's extra=forbid is; `coerce` turns text fields into the model's types where pydantic would not."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            return model.model_validate_json(await request.body()), None
        except ValidationError as exc:
            raise InvalidInput(first_error(exc)) from None
    if ctype == "multipart/form-data":
        lim = settings.limits
        form = await request.form(max_files=1, max_fields=8, max_part_size=lim.max_image_bytes)
        image = form.get("image")
        image_bytes = None
        if image is not None and not isinstance(image, str):
            image_bytes = await image.read(lim.max_image_bytes + 1)
            if len(image_bytes) > lim.max_image_bytes:
                raise ImageTooLarge(f"image exceeds {lim.max_image_bytes} bytes")
        if unknown := sorted(set(form.keys()) - {*fields, "image"}):
            raise InvalidInput(f"{unknown[0]}: unknown form field; send {', '.join(fields)}, image")
        values: dict[str, object] = {k: v for k, v in form.items() if k in fields and isinstance(v, str)}
        if coerce is not None:
            coerce(values)
        try:
            return model.model_validate({**values, "image": image if isinstance(image, str) else None}), image_bytes
        except ValidationError as exc:
            raise InvalidInput(first_error(exc)) from None
    raise UnsupportedMediaType("send application/json or multipart/form-data")
