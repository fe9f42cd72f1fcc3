"""The job worker: one thread that leases the next chunk from the store and links it through the Linker.

Per chunk: decode each item with the same decode stage as /v1/link (`service.conversions.to_query`; a bad
item gets its own error code and fails alone), link the items through the micro-batcher (service/batcher.py:
at job priority, in small batches that yield to /v1/link requests; an item that breaks its batch fails
alone), then one transaction with the outcomes, the chunk's completion and the job's progress.
The commit only lands while the chunk is leased to us and the job still runs, so a cancel stops output at
the next chunk boundary. A second thread renews the lease (heartbeat) while a chunk computes. Several workers
(threads here, `el worker` processes, Ray actors) share one job's chunks. On shutdown the worker finishes its
chunk and commits it; after a crash the chunk's lease runs out (or the next start on this host re-queues it)
and another worker runs the chunk's items that have no outcome yet.
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
from service.jobs.store import ChunkLease, ItemOutcome, JobStore, PendingItem
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
                 linker: Callable[[], Linker | None], batcher: MicroBatcher, owner: str | None = None) -> None:
        self.store, self.settings, self.metrics = store, settings, metrics
        self.cfg = settings.jobs
        self.owner = owner or make_owner()
        self._linker = linker
        self._batcher = batcher
        self._stop = threading.Event()
        self._stop_heartbeat = threading.Event()
        self._wake = threading.Event()
        self._current: ChunkLease | None = None
        self._lost: ChunkLease | None = None  # the lease the heartbeat found gone
        self._last_job: str | None = None
        self._threads: list[threading.Thread] = []
        self._next_sweep = 0.0
        self.chunks_done = 0

    def start(self) -> None:
        for target, name in ((self._loop, "el-job-worker"), (self._heartbeat_loop, "el-job-heartbeat")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        logger.info("job worker %s started", self.owner)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish and commit the current chunk, then stop. A chunk still computing after timeout_s is abandoned
        (daemon thread): its lease expires or the next start on this host re-queues it."""
        self._stop.set()
        self._wake.set()
        if self._threads:
            self._threads[0].join(timeout_s)
            if self._threads[0].is_alive():
                logger.warning("job worker did not stop within %.0f s; its chunk is re-queued when the lease ends",
                               timeout_s)
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
                lease = self.store.claim(self.owner, lease_s=self.cfg.lease_s, max_attempts=self.cfg.max_attempts)
                if lease is None:
                    self._park()
                    self._wake.wait(self.cfg.poll_interval_s)
                    continue
                self._last_job = lease.job_id
                self._run(lease)
            except Exception:  # the worker must outlive a bad moment (disk full, locked file, lost database)
                logger.exception("job worker error")
                self._stop.wait(1.0)
        try:
            self._park()
        except Exception:
            logger.exception("job worker: could not park its last job")

    def _park(self) -> None:
        """Between chunks with nothing left to claim or on the way out: the job we worked on goes back to
        queued if no chunk of it is leased (it shows running only while someone works on it)."""
        if self._last_job is not None:
            self.store.park(self._last_job)
            self._last_job = None

    def _heartbeat_loop(self) -> None:
        while not self._stop_heartbeat.wait(self.cfg.lease_s / 3):
            lease = self._current
            if lease is None:
                continue
            try:
                if not self.store.heartbeat(lease, lease_s=self.cfg.lease_s):
                    self._lost = lease
            except Exception:
                logger.exception("job heartbeat failed")

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.cfg.sweep_interval_s
            self.store.sweep()

    # ---- one chunk ----

    def _run(self, lease: ChunkLease) -> None:
        self._current, self._lost = lease, None
        logger.debug("job %s: chunk %d (items %d-%d), attempt %d", lease.job_id, lease.no, lease.first_seq,
                     lease.last_seq, lease.attempts)
        try:
            pending = self.store.pending(lease)
            outcomes = self._link_chunk(pending) if pending else []
            if self._lost == lease:
                logger.info("job %s: chunk %d lease lost (cancelled or taken over); discarded", lease.job_id, lease.no)
                return
            if not self.store.commit_chunk(lease, outcomes):
                logger.info("job %s: cancelled or lease lost; chunk %d discarded", lease.job_id, lease.no)
                return
            self.chunks_done += 1
            n_err = sum(o.error is not None for o in outcomes)
            self.metrics.job_items.labels("ok").inc(len(outcomes) - n_err)
            self.metrics.job_items.labels("error").inc(n_err)
        except Exception:
            logger.exception("job %s: chunk %d attempt %d failed", lease.job_id, lease.no, lease.attempts)
            try:
                self.store.release(lease, error=f"chunk {lease.no} attempt {lease.attempts} failed: "
                                                "internal error in the worker")
            except Exception:
                logger.exception("job %s: could not hand chunk %d back; its lease will expire", lease.job_id, lease.no)
            self._stop.wait(1.0)  # back off so a failing chunk does not spin through its attempts
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
