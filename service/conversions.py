"""Request <-> pipeline conversions, shared by the HTTP routes and the job worker.

No fastapi or starlette here: the job worker and the intake import this module, and they must not pull
in the HTTP layer. `to_query` is the decode stage for one request (text rules, top_k cap, base64 and image
decoding); callers run it inside the admission-controlled work, in a worker thread, never on the event loop.
"""

from __future__ import annotations

from dataclasses import asdict

from pydantic import ValidationError

from service.errors import InvalidInput
from service.pipeline.decode import base64_image_bytes, clean_text, decode_image
from service.pipeline.types import LinkQuery, LinkResult
from service.schemas import BatchItem, EntityScore, ExplainedLinkResponse, LinkRequest, LinkResponse
from service.settings import Settings

__all__ = ["first_error", "response_fields", "to_explained_response", "to_queries", "to_query", "to_response"]


def first_error(exc: ValidationError) -> str:
    """A pydantic validation error as one short client-safe line: `<field path>: <message>`."""
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


def to_query(req: LinkRequest, settings: Settings, *, image_bytes: bytes | None = None,
             item_id: str | None = None) -> LinkQuery:
    """Decode stage for one request: validated text, capped top_k, safely decoded image.

    A base64 image is refused from its length before it is decoded (`base64_image_bytes`); raw bytes from a
    multipart part come in as `image_bytes`, already held to the byte cap by the caller.
    """
    lim = settings.limits
    mention = clean_text(req.mention, field="mention", max_chars=lim.max_text_chars, required=True)
    context = clean_text(req.context, field="context", max_chars=lim.max_text_chars)
    top_k = req.top_k or settings.top_k
    if top_k > lim.max_top_k:
        raise InvalidInput(f"top_k must be at most {lim.max_top_k}")
    if image_bytes is None and req.image:
        image_bytes = base64_image_bytes(req.image, max_bytes=lim.max_image_bytes)
    image = decode_image(image_bytes, lim, target_size=settings.encoder.image_size) if image_bytes else None
    return LinkQuery(mention=mention, context=context, image=image, top_k=top_k, id=item_id)


def to_queries(items: list[BatchItem], settings: Settings) -> list[LinkQuery]:
    """Decode a batch in input order, each query carrying its item's id; the first bad item fails the batch."""
    return [to_query(item, settings, item_id=item.id) for item in items]


def response_fields(r: LinkResult) -> dict:
    """A LinkResponse's fields (each entity validated as an EntityScore): every link answer is built from them once,
    not built, dumped and validated again."""
    return {"mention": r.mention, "nil": r.nil, "confidence": r.confidence, "index_version": r.index_version,
            "model_version": r.model_version, "timings_ms": {k: round(v, 3) for k, v in r.timings_ms.items()},
            "entities": [EntityScore(**c.__dict__) for c in r.entities]}


def to_response(r: LinkResult) -> LinkResponse:
    return LinkResponse(**response_fields(r))


def to_explained_response(r: LinkResult) -> ExplainedLinkResponse:
    """/v1/link's answer: the LinkResponse, plus the alignments when the query asked for them (explain=true). The
    field is set only then, and the route leaves unset fields out: without explain the answer is a LinkResponse."""
    extra = {} if r.explain is None else {"explain": [asdict(a) for a in r.explain]}
    return ExplainedLinkResponse(**response_fields(r), **extra)
