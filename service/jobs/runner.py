"""The job worker: one thread that claims the oldest queued job and runs it in chunks through the Linker.

Per chunk: decode each item with the same decode stage as /v1/link (`service.conversions.to_query`; a bad
item gets its own error code and fails alone), link the items through the micro-batcher (service/batcher.py:
at job priority, in small batches that yield to /v1/link requests; an item that breaks its batch fails
alone), then one transaction with the outcomes and the progress.
The commit only lands while the job is still running under our lease, so a cancel stops output at the
next chunk boundary. A second thread renews the lease (heartbeat) while a chunk computes. On shutdown
the worker finishes its chunk and hands the job back to the queue (attempt refunded); after a crash the
next start re-queues it and the job resumes at the first item without an outcome.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from service.batcher import MicroBatcher
from service.conversions import to_query, to_response
from service.errors import ELError
from service.jobs.store import ItemOutcome, JobRecord, JobStore, PendingItem
from service.metrics import Metrics
from service.pipeline.linker import Linker
from service.pipeline.types import LinkQuery, LinkResult
from service.schemas import JobItem
from service.settings import Settings

logger = logging.getLogger(__name__)

def make_owner() -> str:
    """A lease owner id: host, pid and a random token (a pid alone is reused across container restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """At start-up: is the process that holds this lease gone? Only decidable for this host; elsewhere
    the lease expiry decides. Our own pid counts as dead: no worker of this process holds a lease yet,
    and a restarted container often gets the pid its predecessor had."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process its parent has not reaped yet still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _error_json(code: str, message: str) -> str:
    return json.dumps({"code": code, "message": message})


class JobRunner:
    def __init__(self, store: JobStore, settings: Settings, metrics: Metrics, *,
                 linker: Callable[[], Linker | None], batcher: MicroBatcher) -> None:
        self.store, self.settings, self.metrics = store, settings, metrics
        self.cfg = settings.jobs
        self.owner = make_owner()
        self._linker = linker
        self._batcher = batcher
        self._stop = threading.Event()
        self._stop_heartbeat = threading.Event()
        self._wake = threading.Event()
        self._current: str | None = None
        self._lost: str | None = None  # job id whose lease the heartbeat found gone
        self._threads: list[threading.Thread] = []
        self._next_sweep = 0.0
        self._next_requeue = 0.0

    def start(self) -> None:
        for target, name in ((self._loop, "el-job-worker"), (self._heartbeat_loop, "el-job-heartbeat")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        logger.info("job worker %s started", self.owner)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the current chunk, hand the job back, stop. A chunk still computing after timeout_s is
        abandoned (daemon thread): its lease expires or the next start re-queues the job."""
        self._stop.set()
        self._wake.set()
        if self._threads:
            self._threads[0].join(timeout_s)
            if self._threads[0].is_alive():
                logger.warning("job worker did not stop within %.0f s; the job is re-queued at the next start", timeout_s)
        self._stop_heartbeat.set()
        for t in self._threads[1:]:
            t.join(5.0)

    def notify(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self._wake.set()

    # ---- loops ----

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._maybe_sweep()
                linker = self._linker()
                if linker is None:  # still loading (or draining): jobs wait in the queue
                    self._stop.wait(min(self.cfg.poll_interval_s, 0.2))
                    continue
                self._wake.clear()
                self._maybe_requeue()
                job = self.store.claim(self.owner, lease_s=self.cfg.lease_s, max_attempts=self.cfg.max_attempts)
                if job is None:
                    self._wake.wait(self.cfg.poll_interval_s)
                    continue
                self._run(job)
            except Exception:  # the worker must outlive a bad moment (disk full, locked file); log and retry
                logger.exception("job worker error")
                self._stop.wait(1.0)

    def _heartbeat_loop(self) -> None:
        while not self._stop_heartbeat.wait(self.cfg.lease_s / 3):
            job_id = self._current
            if job_id is None:
                continue
            try:
                if not self.store.heartbeat(job_id, self.owner, lease_s=self.cfg.lease_s):
                    self._lost = job_id
            except Exception:
                logger.exception("job heartbeat failed")

    def _maybe_requeue(self) -> None:
        """Another process's worker that died mid-job: its lease runs out and the job goes back to the queue."""
        now = time.monotonic()
        if now >= self._next_requeue:
            self._next_requeue = now + self.cfg.lease_s / 3
            self.store.requeue_expired()

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.cfg.sweep_interval_s
            self.store.sweep()

    # ---- one job ----

    def _run(self, job: JobRecord) -> None:
        self._current, self._lost = job.id, None
        logger.info("job %s: attempt %d, %d/%d items done", job.id, job.attempts, job.done, job.total)
        cursor = 0
        try:
            while True:
                if self._stop.is_set():
                    self.store.release(job.id, self.owner, refund=True)
                    logger.info("job %s handed back to the queue (shutdown)", job.id)
                    return
                if self._lost == job.id or not self.store.is_ours(job.id, self.owner):
                    logger.info("job %s: cancelled or lease lost; stopping", job.id)
                    return
                linker = self._linker()
                if linker is None:
                    self.store.release(job.id, self.owner, refund=True)
                    logger.info("job %s handed back to the queue (service not ready)", job.id)
                    return
                self._maybe_sweep()
                pending = self.store.pending(job.id, from_seq=cursor, limit=self.cfg.chunk_size)
                if not pending:
                    break
                outcomes = self._link_chunk(pending)
                if not self.store.commit_chunk(job.id, self.owner, outcomes, lease_s=self.cfg.lease_s):
                    logger.info("job %s: cancelled or lease lost; chunk discarded", job.id)
                    return
                n_err = sum(o.error is not None for o in outcomes)
                self.metrics.job_items.labels("ok").inc(len(outcomes) - n_err)
                self.metrics.job_items.labels("error").inc(n_err)
                cursor = pending[-1].seq + 1
            if self.store.finish(job.id, self.owner):
                logger.info("job %s succeeded", job.id)
        except Exception:
            logger.exception("job %s: attempt %d failed", job.id, job.attempts)
            try:
                self.store.release(job.id, self.owner, error=f"attempt {job.attempts} failed: internal error in the worker")
            except Exception:
                logger.exception("job %s: could not hand the job back; its lease will expire", job.id)
            self._stop.wait(1.0)  # back off so a failing job does not spin through its attempts
        finally:
            self._current = None

    def _link_chunk(self, pending: list[PendingItem]) -> list[ItemOutcome]:
        outcomes: dict[int, ItemOutcome] = {}
        runnable: list[tuple[PendingItem, LinkQuery]] = []
        for p in pending:
            try:
                item = JobItem.model_validate_json(p.request)
                runnable.append((p, to_query(item, self.settings, item_id=p.item_id)))
            except ELError as exc:
                outcomes[p.seq] = ItemOutcome(p.seq, p.item_id, error=_error_json(exc.code, exc.message))
            except ValidationError:
                outcomes[p.seq] = ItemOutcome(p.seq, p.item_id, error=_error_json("invalid_input", "not a link request"))
        if runnable:
            results = self._batcher.link_items([q for _, q in runnable])
            for (p, _), r in zip(runnable, results, strict=True):
                outcomes[p.seq] = self._outcome(p, r)
            self.metrics.mentions.labels("job").inc(sum(not isinstance(r, Exception) for r in results))
        return [outcomes[p.seq] for p in pending]

    @staticmethod
    def _outcome(p: PendingItem, r: LinkResult | Exception) -> ItemOutcome:
        if isinstance(r, ELError):
            return ItemOutcome(p.seq, p.item_id, error=_error_json(r.code, r.message))
        if isinstance(r, Exception):
            logger.error("item %r could not be linked", p.item_id, exc_info=r)
            return ItemOutcome(p.seq, p.item_id, error=_error_json("internal", "internal error while linking this item"))
        return ItemOutcome(p.seq, p.item_id, result=to_response(r).model_dump_json())
