"""Schemathesis extensions for tests/hardening/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

Two input rules cannot be written in JSON Schema; the document names them by media type and description, and
this module makes generated schema-valid cases follow them:
- an image must decode: the multipart image part declares `image/jpeg, image/png, image/webp`, generated here
  as real images of random size and colour; a non-empty base64 `image` of a schema-valid JSON case becomes
  such an image too (deliberately invalid cases go out as generated);
- a job file is JSONL of link requests with ids unique within the job: the multipart file part declares
  `application/x-ndjson`, generated here as such lines; ids of schema-valid JSON job items get their position
  as a prefix; the base64 images of entity changes become real images too.
Everything else in a case (texts, top_k, item counts, headers, path ids) stays as generated, but for one
schemathesis quirk named in `map_case`.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _image(fmt: str, size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


_SIZES = st.tuples(st.integers(1, 48), st.integers(1, 48))
_COLOURS = st.tuples(*[st.integers(0, 255)] * 3)
for _fmt in ("JPEG", "PNG", "WEBP"):
    schemathesis.openapi.media_type(f"image/{_fmt.lower()}",
                                    st.builds(lambda s, c, f=_fmt: _image(f, s, c), _SIZES, _COLOURS))

_MENTIONS = st.text(st.characters(categories=("L", "N", "P", "Zs")), min_size=1, max_size=40).filter(str.strip)
schemathesis.openapi.media_type("application/x-ndjson", st.lists(_MENTIONS, min_size=1, max_size=4).map(
    lambda ms: "".join(json.dumps({"id": str(i), "mention": m}) + "\n" for i, m in enumerate(ms)).encode()))

PNG_B64 = base64.b64encode(_image("PNG", (1, 1), (200, 30, 30))).decode()


def _real_image(item: Any) -> None:
    if isinstance(item, dict) and isinstance(item.get("image"), str) and item["image"]:
        item["image"] = PNG_B64


@schemathesis.hook
def map_case(ctx: Any, case: Any) -> Any:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    path, body = case.operation.path, case.body
    media = (case.media_type or "").split(";")[0]
    if path == "/v1/entities:batch":
        if media == "application/json" and isinstance(body, list):
            for item in body:
                _real_image(item)
        return case
    if path == "/v1/entities/{entity_id}" and media == "application/json" and isinstance(body, dict):
        _real_image(body)
        return case
    if not isinstance(body, dict):
        return case
    if (case.media_type or "").split(";")[0] == "multipart/form-data":
        # Schemathesis 4.32's coverage phase builds a multipart body from media-type strategies and fills the
        # required fields it has no strategy for with "", ignoring minLength and pattern, yet calls the case
        # schema-valid: give it a mention the schema allows.
        if path == "/v1/link" and body.get("mention") == "":
            body["mention"] = "Berlin"
        if path == "/v1/entities/{entity_id}" and body.get("name") == "":
            body["name"] = "Berlin"
        return case
    if (case.media_type or "").split(";")[0] != "application/json":
        return case
    if path == "/v1/link":
        _real_image(body)
    elif path == "/v1/link/batch":
        for item in body.get("items") or []:
            _real_image(item)
    elif path == "/v1/jobs":
        for i, item in enumerate(body.get("items") or []):
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                item["id"] = f"{i}-{item['id']}"[:256]
    return case
