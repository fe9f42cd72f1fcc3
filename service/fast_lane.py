"""The fast lane: POST /v1/link with a JSON body and no query string, answered without the framework's layers.

That request is most of what a linking service serves, and on a small CPU the per-request cost of the layers
between our middleware and the route shows: Starlette's exception middleware, FastAPI's exit stack, the router's
match over every route, the route wrapper and its parameter solving, each an async frame on the one event-loop
thread that every request and every batch hand-over goes through. The lane sits innermost of our middleware
(CORS, metrics, API key and body cap still apply, unchanged) and runs what the route runs, in the same order:
readiness, the body validated as a LinkRequest, admission and the micro-batcher (`run_linker`), the answer written
by `link_answer` (one pydantic-core call); errors get the bodies, statuses and headers of the app's handlers.
Anything else (multipart, `?explain=true` or any query string, another content type, a mounted root path) takes
the route. Measured by `python scripts/bench_fast_lane.py` (`reports/bench-fast-lane.json`; README: Evaluation
and benchmarks). `EL_LINK_FAST_LANE=false` sends every request through the route.
"""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.conversions import first_error
from service.errors import ELError, InvalidInput
from service.routes.link import link_answer, link_queries, run_linker
from service.schemas import LinkRequest
from service.state import AppState

logger = logging.getLogger(__name__)

PATH = "/v1/link"


def _content_type(scope: Scope) -> str:
    """The first Content-Type header's media type, lowercased (what `request.headers.get` reads)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower()
    return ""


def takes_lane(scope: Scope) -> bool:
    return (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == PATH
            and not scope.get("query_string") and not scope.get("root_path")
            and _content_type(scope) == "application/json")


class LinkFastLane:
    def __init__(self, app: ASGIApp, state: AppState, route: BaseRoute) -> None:
        """`route`: the app's POST /v1/link route, set on the scope as the router would (metrics label by it)."""
        self.app, self.state, self.route = app, state, route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not takes_lane(scope):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        body = await _read_body(receive)
        if body is None:  # the client left while sending: nobody to answer
            return
        try:
            data = await self._link(body, receive)
        except ELError as exc:  # the app's `domain_error` handler's answer
            await JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(data)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})

    async def _link(self, body: bytes, receive: Receive) -> bytes:
        state = self.state
        state.require_linker()
        try:
            req = LinkRequest.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidInput(first_error(exc)) from None
        outcome = await run_linker(state, lambda: link_queries(req, state.settings), "link", receive)
        return link_answer(outcome).encode()


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
