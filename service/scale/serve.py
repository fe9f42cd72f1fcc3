"""`el serve --ray`: the API as a Ray Serve application of N replicas behind Serve's HTTP proxy on EL_HOST:EL_PORT.

Each replica is the whole `el serve` app (`create_app`: the same routes, errors, limits, auth and probes) with its
own Linker and micro-batcher, so one HTTP request costs one hop (proxy -> replica) and requests that land on a
replica batch together there. `max_ongoing_requests` is raised from Ray's default of 5 (which would cap every
micro-batch at 5) to EL_RAY__MAX_ONGOING_REQUESTS; the app's own admission control still answers 429 beyond its
queue. Each replica reserves EL_RAY__REPLICA_CPUS and sets ONNX Runtime's and torch's threads to that number.

Entity changes: with EL_RAY__SHARED_INDEX every replica follows the index folder's change log (kg_index/changelog.py)
and any of them takes a change; without it (each node with its own copy of the folder) replicas refuse them.

Metrics: each replica's /metrics (el_* series) is that replica's registry only; through the proxy a scrape reaches
one replica at random. Scrape Ray's own Prometheus endpoint instead (every node's metrics export port, see
`ray start --metrics-export-port`), which carries Serve's series (ray_serve_*) per replica, or each replica's
/metrics directly. README: Scaling out.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from service.scale.cluster import connect, pinned_threads, portable
from service.settings import Settings

logger = logging.getLogger(__name__)

APP_NAME = "el"
DEPLOYMENT_NAME = "LinkReplica"


def build_application(settings: Settings, *, replicas: int | None = None) -> Any:
    """The Serve application (a bound deployment) for these settings."""
    from ray import serve

    cfg = settings.ray
    shipped = portable(settings)

    @serve.deployment(name=DEPLOYMENT_NAME, num_replicas=replicas or cfg.replicas,
                      max_ongoing_requests=cfg.max_ongoing_requests,
                      ray_actor_options={"num_cpus": cfg.replica_cpus},
                      health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=10)
    @serve.ingress()
    class LinkReplica:
        def __init__(self, settings: Settings) -> None:
            from service.logging_setup import configure_logging
            from service.pipeline.linker import Linker

            self.settings = pinned_threads(settings, settings.ray.replica_cpus)
            configure_logging(self.settings.log_level)
            # Loaded here, before Serve marks the replica running: a replacement replica gets no traffic (and
            # answers no 503) while it loads. The app's own start-up then only warms it up again.
            # EL_RAY__SHARED_INDEX: every replica on the one folder's change log, as `el serve --workers N` does.
            self.linker = (Linker.for_serving(self.settings) if self.settings.ray.shared_index
                           else Linker.from_settings(self.settings))
            self.linker.warm_up()
            # The update encoder too, when changes are taken: else the app's start-up loads it, answering 503 meanwhile.
            self.linker.warm_up_updates()
            self._el_app: Any = None

        def __serve_build_asgi_app__(self) -> Any:
            from ray import serve

            from service.app import create_app
            from service.middleware import AnswerHeader

            linker = self.linker
            app = create_app(self.settings, linker_factory=lambda _: linker)
            app.add_middleware(AnswerHeader, name="x-el-replica",
                               value=serve.get_replica_context().replica_id.unique_id)
            self._el_app = app
            return app

        def check_health(self) -> None:
            """Serve restarts a replica whose model or index failed to load."""
            state = getattr(getattr(self._el_app, "state", None), "el", None)
            if state is not None and state.load_error:
                raise RuntimeError(state.load_error)

    return LinkReplica.bind(shipped)


def deploy(settings: Settings, *, replicas: int | None = None) -> None:
    """Start Serve's proxy on EL_HOST:EL_PORT (first deployment on the cluster) and deploy the app; returns once
    every replica has started (loading the index may still be under way: /readyz says when)."""
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    # Serve's per-request access log duplicates the app's metrics and would log every request at INFO.
    serve.run(build_application(settings, replicas=replicas), name=APP_NAME, route_prefix="/",
              logging_config={"log_level": settings.log_level, "enable_access_log": False})
    logger.info("serving %d replica(s) on http://%s:%d", replicas or settings.ray.replicas, settings.host,
                settings.port)


def run_serve(settings: Settings, *, replicas: int | None = None) -> int:
    """`el serve --ray`: join or start Ray, deploy, serve until SIGTERM/SIGINT, then tear the app down."""
    ray = connect(settings)
    from ray import serve

    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deploy(settings, replicas=replicas)
    while not stop.wait(1.0):
        pass
    logger.info("shutting down Serve")
    serve.delete(APP_NAME)
    if not settings.ray.address:
        serve.shutdown()
        ray.shutdown()
    return 0
