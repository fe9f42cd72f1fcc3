"""Optional API keys: off by default; once keys are configured every route needs one except liveness, readiness,
the API docs and (unless `protect_metrics`) /metrics. Deny by default: a route added later (/v1/...) is covered.

A key is accepted from `Authorization: Bearer <key>` or `X-API-Key: <key>`. The check compares SHA-256
digests with `hmac.compare_digest` against every configured key, without stopping at a match, so the time it
takes does not depend on which key (or how much of one) matched. Keys never reach logs or error bodies.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Unauthorized
from service.metrics import Metrics
from service.middleware import send_error

logger = logging.getLogger(__name__)

# Open even when keys are configured: probes, the API description, and (by default) Prometheus.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/", "/ui"})
OPEN_PREFIXES = ("/ui/",)  # the web page and its static files (service/routes/ui.py): no data, it asks for the key


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k.encode()) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, presented: bytes | None) -> bool:
        if presented is None or not self._digests:
            return False
        candidate = _digest(presented)
        ok = False
        for known in self._digests:  # no early exit: every key is compared every time
            ok |= hmac.compare_digest(candidate, known)
        return ok


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries, from `Authorization: Bearer` or `X-API-Key` (Bearer wins)."""
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            bearer = value[7:].strip()
        elif name == b"x-api-key":
            api_key = value.strip()
    return bearer if bearer else api_key or None


class AuthMiddleware:
    """401 `unauthorized` for protected paths without a valid key; a no-op when no key is configured."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, metrics: Metrics, *, protect_metrics: bool = False) -> None:
        self.app, self.keys, self.metrics = app, keys, metrics
        self.protect_metrics = protect_metrics

    def _open(self, scope: Scope) -> bool:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
                or (path == "/metrics" and not self.protect_metrics))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or self._open(scope):
            await self.app(scope, receive, send)
            return
        if self.keys.check(presented_key(scope["headers"])):
            await self.app(scope, receive, send)
            return
        self.metrics.auth_failures.inc()
        logger.info("refused %s %s: missing or invalid API key", scope.get("method", ""), scope["path"])
        err = Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        await send_error(send, err.status, err.code, err.message, {"WWW-Authenticate": "Bearer"})


def document_security(app: FastAPI, *, protect_metrics: bool) -> None:
    """Advertise the two key schemes in the OpenAPI document (only called when keys are configured)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearer"] = {"type": "http", "scheme": "bearer"}
        schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        unauthorized = {"description": "Missing or invalid API key",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, operations in schema.get("paths", {}).items():
            if path in OPEN_PATHS or (path == "/metrics" and not protect_metrics):
                continue
            for op in operations.values():
                op["security"] = [{"bearer": []}, {"apiKey": []}]
                op.setdefault("responses", {}).setdefault("401", unauthorized)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
