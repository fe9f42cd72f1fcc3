"""POST /v1/link (JSON or multipart) and POST /v1/link/batch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import Receive

from service.conversions import response_fields, to_explained_response, to_queries, to_query
from service.errors import TooManyItems, UnsupportedMediaType
from service.pipeline.linker import BatchOutcome
from service.pipeline.types import LinkQuery
from service.routes.forms import parse_json_or_form
from service.schemas import (
    BatchLinkRequest,
    BatchLinkResponse,
    BatchResult,
    ErrorResponse,
    ExplainedLinkResponse,
    LinkRequest,
    inline_schema,
)
from service.settings import Settings
from service.state import AppState

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["link"])

_ERRORS = {code: {"model": ErrorResponse} for code in (413, 415, 422, 429, 503, 504)}
EXPLAIN_DOC = (
    "Also return the alignment pictures of the top 3 entities (`explain` in the answer): the mention's and the "
    "entity's tokens (wordpieces) and the Sinkhorn transport plan the reranker scored them with, and for a mention "
    "with an image the plan over the 7x7 patch grids. At most 38 x 38 token cells and 49 x 49 patch cells per "
    "entity (about 100 KB of JSON for 3 entities with images). Off by default: without it nothing is recorded.")
_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["mention"],
    "properties": {
        "mention": {"type": "string"},
        "context": {"type": "string"},
        "top_k": {"type": "integer", "minimum": 1},
        "image": {"type": "string", "format": "binary"},
    },
}


async def run_linker(state: AppState, decode: Callable[[], list[LinkQuery]], source: str,
                     receive: Receive | None = None) -> BatchOutcome:
    """Admission (queue, deadline, disconnect while queued), then, in a worker thread, decode and the pipeline
    through the micro-batcher (service/batcher.py: this request's mentions share a link_batch call with others').

    `decode` (text rules, base64 and image decoding) runs inside the admitted work, not on the event loop:
    a full server refuses before any decoding work, so a bad request to a full server gets 429, not its 4xx.
    """
    state.require_linker()
    adm = state.admission
    deadline = adm.deadline()
    gone = (lambda: client_gone(receive)) if receive is not None else None
    ticket = state.batcher.ticket()

    def work() -> BatchOutcome:
        return state.batcher.link(decode(), deadline=deadline, ticket=ticket)

    outcome = await adm.run(work, deadline=deadline, disconnected=gone, withdraw=ticket.withdraw)
    state.metrics.mentions.labels(source).inc(len(outcome.results))
    return outcome


async def client_gone(receive: Receive) -> None:
    """Return once the client has disconnected. The body has been read by then, so the only message left
    on the channel is http.disconnect; until it comes this just waits (uvicorn wakes it)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _parse_link_request(request: Request, settings: Settings) -> tuple[LinkRequest, bytes | None]:
    return await parse_json_or_form(request, settings, LinkRequest, ("mention", "context", "top_k"))


@router.post(
    "/link",
    response_model=ExplainedLinkResponse,
    response_model_exclude_unset=True,  # `explain` only when asked for (every other field is always set)
    responses=_ERRORS,
    summary="Link one mention (JSON, or multipart with an image file part)",
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(LinkRequest)},
        "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
    }}},
)
async def link(request: Request, explain: bool = Query(False, description=EXPLAIN_DOC)) -> Response:
    state: AppState = request.app.state.el
    state.require_linker()
    req, image_bytes = await _parse_link_request(request, state.settings)
    outcome = await run_linker(state, lambda: link_queries(req, state.settings, image_bytes, explain), "link",
                               request.receive)
    return Response(link_answer(outcome), media_type="application/json")


def link_queries(req: LinkRequest, settings: Settings, image_bytes: bytes | None = None,
                 explain: bool = False) -> list[LinkQuery]:
    """/v1/link's decode stage (this route's and the fast lane's, service/fast_lane.py), run inside the admitted work."""
    return [replace(to_query(req, settings, image_bytes=image_bytes), explain=explain)]


def link_answer(outcome: BatchOutcome) -> str:
    """/v1/link's answer (see `json_response`): `explain` only when asked for, every other field is always set."""
    return to_explained_response(outcome.results[0]).model_dump_json(exclude_unset=True)


def json_response(model: BaseModel, *, exclude_unset: bool = False) -> Response:
    """The answer as JSON in one pydantic-core call. A returned Response skips FastAPI's own response path (validate
    the model again against response_model, turn it into plain objects, json.dumps): about 0.9 ms on the event
    loop for a 10-entity link answer, against 15 us here. The models were validated when they were built, and the
    routes keep response_model for the OpenAPI document."""
    return Response(model.model_dump_json(exclude_unset=exclude_unset), media_type="application/json")


def require_json(request: Request) -> None:
    """Runs before FastAPI validates the body, so a non-JSON body is a 415, not a schema error."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType("send application/json")


@router.post("/link/batch", response_model=BatchLinkResponse, responses=_ERRORS, summary="Link up to N mentions",
             dependencies=[Depends(require_json)])
async def link_batch(body: BatchLinkRequest, request: Request) -> Response:
    state: AppState = request.app.state.el
    cap = state.settings.limits.max_batch_items
    if len(body.items) > cap:
        raise TooManyItems(f"at most {cap} items per batch (got {len(body.items)}); use /v1/jobs for more")
    state.require_linker()
    outcome = await run_linker(state, lambda: to_queries(body.items, state.settings), "batch", request.receive)
    results = [BatchResult(**response_fields(r), id=r.id) for r in outcome.results]
    first = outcome.results[0]
    return json_response(BatchLinkResponse(results=results, index_version=first.index_version,
                                           model_version=first.model_version,
                                           timings_ms={k: round(v, 3) for k, v in outcome.timings_ms.items()}))
