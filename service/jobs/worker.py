"""A job worker outside the API process: `el worker` (a plain process for systemd or Kubernetes) and each Ray
actor of `el worker --ray` (service/scale/workers.py) run one of these.

It is the embedded worker without the HTTP server: the same Linker (loaded from the same settings and index; `el
worker` also follows the index folder's change log, so entity changes made through the API reach its jobs),
the same micro-batcher in front of it, the same JobRunner leasing chunks from the shared store
(EL_JOBS__DATABASE_URL, PostgreSQL for workers on several machines). Several workers on one store share its
chunks; the API processes then run with EL_JOBS__RUN_WORKER=false.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from service.batcher import MicroBatcher
from service.heap import freeze_loaded_heap
from service.jobs.runner import JobRunner, owner_is_dead
from service.jobs.store import JobStore, open_store
from service.metrics import Metrics
from service.pipeline.linker import BatchOutcome, Linker
from service.pipeline.types import LinkQuery
from service.settings import Settings

logger = logging.getLogger(__name__)


class JobWorker:
    def __init__(self, settings: Settings, *, linker_factory: Callable[[Settings], Linker] = Linker.from_settings,
                 owner: str | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._factory = linker_factory
        self._owner = owner
        self.store: JobStore | None = None
        self.linker: Linker | None = None
        self.runner: JobRunner | None = None

    def start(self) -> None:
        """Open the store, re-queue chunks a dead worker on this host left, load the Linker, start leasing."""
        self.store = open_store(self.settings.jobs)
        self.store.recover(owner_is_dead)
        linker = self._factory(self.settings)
        linker.warm_up()
        freeze_loaded_heap()
        self.linker = linker

        def link_batch(queries: list[LinkQuery], deadline: float | None) -> BatchOutcome:
            return linker.link_batch(queries, deadline=deadline)

        batcher = MicroBatcher.from_settings(self.settings.batching, link_batch, self.metrics)
        self.runner = JobRunner(self.store, self.settings, self.metrics, linker=lambda: self.linker,
                                batcher=batcher, owner=self._owner)
        self.runner.start()
        logger.info("job worker %s on %s: index %s", self.runner.owner, self.store.describe(), linker.index.version)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish and commit the chunk in hand, then close the store."""
        if self.runner is not None:
            self.runner.stop(timeout_s)
        if self.store is not None:
            self.store.close()

    def stats(self) -> dict[str, object]:
        return {"owner": self.runner.owner if self.runner else None,
                "chunks_done": self.runner.chunks_done if self.runner else 0}


def run_worker(settings: Settings, *, metrics_port: int | None = None) -> int:
    """`el worker`: run until SIGTERM or SIGINT, then finish the chunk in hand and exit 0."""
    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        stop.set()  # only a flag: the main thread does the work

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The index folder's change log is followed (Linker.for_serving), as by the API's processes on this host: a job
    # links against the entities as changed through the API, and after a compaction, against the compacted folder.
    worker = JobWorker(settings, linker_factory=Linker.for_serving)
    worker.start()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=settings.host, registry=worker.metrics.registry)
        logger.info("worker metrics on http://%s:%d/metrics", settings.host, metrics_port)
    while not stop.wait(1.0):
        pass
    logger.info("stopping: finishing the chunk in hand")
    worker.stop(settings.shutdown.grace_s)
    return 0
