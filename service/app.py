"""The FastAPI app factory: `create_app(settings)`; nothing happens at import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import compile_path

from kg_index.manifest import IndexIntegrityError
from service import openapi
from service.admission import Admission
from service.auth import ApiKeys, AuthMiddleware, document_security
from service.batcher import MicroBatcher
from service.decode_process import DecodeProcess
from service.errors import ELError, NotReady
from service.fast_lane import PATH as FAST_PATH
from service.fast_lane import LinkFastLane
from service.heap import freeze_loaded_heap
from service.jobs.manager import JobManager
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.peers import Peers
from service.pipeline.linker import BatchOutcome, Linker
from service.pipeline.types import LinkQuery
from service.routes import admin as admin_routes
from service.routes import entities, health, link, ui
from service.routes import jobs as job_routes
from service.settings import Settings
from service.state import AppState
from service.updates import EntityUpdater

logger = logging.getLogger(__name__)

LinkerFactory = Callable[[Settings], Linker]
_HTTP_METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"})


def _load(state: AppState, factory: LinkerFactory) -> None:
    """Runs in a thread: load encoders and index, warm up, then flip readiness."""
    try:
        linker = factory(state.settings)
        linker.warm_up()
        if hasattr(linker, "warm_up_updates"):  # before ready: a first change pays no load, a first link no contention
            linker.warm_up_updates()
    except IndexIntegrityError as exc:  # the message names the file (and both KGs): no traceback needed
        logger.error("start-up failed: %s", exc)
        state.load_error = f"start-up failed: {exc}"
        return
    except Exception as exc:  # a broken index or model must not take liveness down; readiness reports it
        logger.exception("start-up failed")
        state.load_error = f"start-up failed: {exc}"
        return
    freeze_loaded_heap()
    state.linker = linker
    state.ready = True
    state.metrics.ready.set(1)
    logger.info("ready: index %s, model %s", linker.index.version, linker.model_version)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the document gives the paths that match (Starlette's own 405 names only the first matching
    route's methods); empty for an undocumented path. HEAD comes with GET, as Starlette serves it."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods |= {m.upper() for m in operations if m.upper() in _HTTP_METHODS}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def create_app(settings: Settings, *, linker_factory: LinkerFactory = Linker.for_serving,
               serve_when_loaded: bool = False, peers: Peers | None = None) -> FastAPI:
    """The app. `serve_when_loaded`: the lifespan's start-up waits for the index and encoders (uvicorn listens only
    after it), for a worker process that must not answer 503 "loading" while the others are ready.
    `peers`: this is one worker process of `el serve --workers N`: /metrics answers for all of them
    (service/metrics_share.py) and an admin reload reaches them all (service/peers.py)."""
    metrics = Metrics()
    share = metrics.share_with(peers.folder, peers.worker) if peers is not None else None
    adm = settings.admission
    admission = Admission(max_in_flight=adm.max_in_flight, max_queue=adm.max_queue, timeout_s=adm.request_timeout_s,
                          retry_after_s=adm.retry_after_s, metrics=metrics)

    def link_batch(queries: list[LinkQuery], deadline: float | None) -> BatchOutcome:
        linker = state.linker
        if linker is None:  # routes and the job worker check readiness first; this is only a guard
            raise NotReady("model and index are still loading", headers={"Retry-After": "5"})
        return linker.link_batch(queries, deadline=deadline)

    # One batcher for the routes and the job worker: job items go through it at lower priority.
    batcher = MicroBatcher.from_settings(settings.batching, link_batch, metrics)
    state = AppState(settings=settings, metrics=metrics, admission=admission, batcher=batcher, peers=peers)
    # The job worker runs only while ready and not draining (on SIGTERM it hands its job back at the next chunk).
    state.jobs = JobManager(settings, metrics, linker=lambda: state.linker if state.ready and not state.draining else None,
                            batcher=batcher)
    up = settings.updates
    state.updater = EntityUpdater(lambda: state.require_linker(), encode_batch=up.encode_batch,
                                  max_pending=up.max_pending, compact_after=up.compact_after, enabled=up.enabled,
                                  metrics=metrics, nice=up.nice)
    state.entity_decoding = DecodeProcess(settings, nice=up.nice, enabled=up.decode_process)
    metrics.track_model_invocations(lambda: state.linker.runtime.invocations if state.linker else 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(asyncio.to_thread(_load, state, linker_factory))
        app.state.el_loader = loader
        if share is not None:
            share.start()
        await asyncio.to_thread(state.jobs.start)  # open the store, re-queue a dead worker's jobs
        if serve_when_loaded:
            await asyncio.shield(loader)  # _load keeps its own errors (readiness reports them)
        try:
            yield
        finally:
            state.draining = True
            state.ready = False
            metrics.ready.set(0)
            await asyncio.to_thread(state.jobs.stop)  # finish the chunk, hand the job back to the queue
            await asyncio.to_thread(state.updater.close)  # acknowledged changes are logged already; finish the rest
            state.entity_decoding.close()
            if share is not None:
                share.close()

    app = FastAPI(
        title="OT-MEL entity linking",
        version="0.1.0",
        description="Links a mention (text, optionally an image) to the entities of a knowledge graph: ONNX "
                    "encoders, FAISS retrieval, optimal-transport reranking.",
        lifespan=lifespan,
    )
    app.state.el = state

    @app.exception_handler(ELError)
    async def domain_error(_: Request, exc: ELError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = list(first.get("loc", ()))
        if first.get("type") == "json_invalid":  # loc is ("body", character offset)
            msg = f"body: invalid JSON at character {loc[-1]}"
        else:
            where = ".".join(str(p) for p in loc if p != "body") or "body"
            msg = f"{where}: {first.get('msg', 'invalid request')}"
        return JSONResponse({"error": {"code": "invalid_input", "message": msg}}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # an unparseable body (FastAPI's JSON, Starlette's multipart): invalid input
            return JSONResponse({"error": {"code": "invalid_input", "message": str(exc.detail)}}, status_code=422)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405 and (methods := allowed_methods(request.app, request.url.path)):
            headers["Allow"] = ", ".join(methods)
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"code": "internal", "message": "internal server error"}}, status_code=500)

    app.include_router(health.router)
    app.include_router(link.router)
    app.include_router(entities.router)
    app.include_router(job_routes.router)
    app.include_router(admin_routes.router)
    ui.install(app)  # the web page at / (static files; it calls the routes above)
    openapi.install(app, settings)  # the document states the limits of these settings
    if settings.link_fast_lane:  # innermost of ours: the body cap, the API key, metrics and CORS apply to it as well
        route = next(r for r in link.router.routes if isinstance(r, APIRoute) and r.path == FAST_PATH
                     and "POST" in r.methods)
        app.add_middleware(LinkFastLane, state=state, route=route)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes,
                       path_limits={"/v1/jobs": settings.jobs.max_body_bytes,
                                    "/v1/entities:batch": settings.updates.max_body_bytes})
    # Outside the body cap: a request without a key is refused before its body is read.
    keys = ApiKeys(k.get_secret_value() for k in settings.auth.api_keys)
    app.add_middleware(AuthMiddleware, keys=keys, metrics=metrics, protect_metrics=settings.auth.protect_metrics)
    if keys:
        document_security(app, protect_metrics=settings.auth.protect_metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors.allow_origins:  # outermost: preflights need no key, and 4xx answers carry CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors.allow_origins,
                           allow_methods=["GET", "POST", "PUT", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key", "Idempotency-Key"],
                           expose_headers=["Retry-After", "Location"])
    return app
