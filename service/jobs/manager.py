"""The jobs subsystem of one app: opens the store, recovers it, runs the worker (unless EL_JOBS__RUN_WORKER is
false: `el worker` processes elsewhere do the work); routes reach it via AppState.jobs."""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.batcher import MicroBatcher
from service.errors import NotReady
from service.jobs.runner import JobRunner, owner_is_dead
from service.jobs.store import STATES, JobStore, open_store
from service.metrics import Metrics
from service.pipeline.linker import Linker
from service.settings import Settings

logger = logging.getLogger(__name__)

class JobManager:
    def __init__(self, settings: Settings, metrics: Metrics, *, linker: Callable[[], Linker | None],
                 batcher: MicroBatcher) -> None:
        self.settings = settings
        self.cfg = settings.jobs
        self.metrics = metrics
        self._linker = linker
        self._batcher = batcher
        self._store: JobStore | None = None
        self._runner: JobRunner | None = None
        metrics.track_job_states(self._counts)

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise NotReady("the job store is not open", headers={"Retry-After": "5"})
        return self._store

    def start(self) -> None:
        """Open the store, re-queue chunks a dead worker on this host left running, start the worker (it waits
        for the Linker)."""
        self._store = open_store(self.cfg)
        self._store.recover(owner_is_dead)
        logger.info("job store %s open", self._store.describe())
        if not self.cfg.run_worker:
            logger.info("no job worker in this process (EL_JOBS__RUN_WORKER=false): `el worker` runs the jobs")
            return
        self._runner = JobRunner(self._store, self.settings, self.metrics, linker=self._linker,
                                 batcher=self._batcher)
        self._runner.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._runner is not None:
            self._runner.stop(timeout_s)
            self._runner = None
        if self._store is not None:
            store, self._store = self._store, None
            store.close()

    def notify(self) -> None:
        if self._runner is not None:
            self._runner.notify()

    def _counts(self) -> dict[str, int]:
        store = self._store
        try:
            return store.counts() if store is not None else dict.fromkeys(STATES, 0)
        except Exception:  # closing at shutdown while a scrape runs; a scrape must not fail
            logger.debug("job counts unavailable", exc_info=True)
            return dict.fromkeys(STATES, 0)
