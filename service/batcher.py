"""Dynamic micro-batching: concurrent /v1/link and /v1/link/batch requests, and job items, share `link_batch` calls.

Leader/follower, with no thread of its own. Every caller waits in its own worker thread. When no batch is
being formed and fewer than `max_concurrent` batches run, a caller whose own entry is still queued becomes the
leader: it waits until `max_batch` mentions are queued or `max_wait_ms` has passed since the oldest arrived
(and never past half the time a queued request had left, so never up to its deadline; and not at all when no
batch is running, unless `wait_when_idle`: a lone request pays no wait), takes the batch, runs
one `link_batch` for everyone outside the lock and hands each caller its own slice of the results, or its own
exception. Only a caller with a queued entry leads, so nobody whose answer is ready is kept to run others' work.

- Interactive entries always go first. While interactive work is queued, running or ran in the last
  `job_max_yield_ms`, a job batch starts no sooner than `job_max_yield_ms` after the job's previous batch ended (so
  a busy API slows a job down but never starves it). Job batches hold up to `job_max_batch` items, and up to
  `job_idle_batch` once no interactive work was seen for JOB_IDLE_AFTER x `job_max_yield_ms` (1 s at the defaults):
  a job alone runs at the pipeline's batched speed (per mention, a batch of 8 costs about 1.6x one of 64 on a
  2-core CPU), while sparse requests keep its batches small.
- One request's mentions stay together (a /v1/link/batch request is one entry); a job's items are one entry each.
- If `link_batch` raises for a batch, its entries are retried one by one, so a bad entry fails alone.
- An entry whose deadline passes while queued gets DeadlineExceeded and never runs; a withdrawn entry (its
  client left, or its request gave up) is dropped before the model.
- A batch is one `link_batch` call, which reads the index snapshot once: one index answers the whole batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from service.errors import ClientDisconnected, DeadlineExceeded
from service.metrics import Metrics
from service.pipeline.linker import BatchOutcome
from service.pipeline.types import LinkQuery, LinkResult
from service.settings import BatchingSettings

logger = logging.getLogger(__name__)

Kind = Literal["interactive", "job"]
KINDS: tuple[Kind, ...] = ("interactive", "job")
# Job batches grow to job_idle_batch only once no interactive work was seen for this many job_max_yield_ms.
JOB_IDLE_AFTER = 5.0
# A waiting thread looks again at least this often: only a safety net, every change wakes who it concerns.
_RECHECK_S = 1.0
# Runs one batch: (queries, deadline or None) -> outcome with one result per query, in order.
LinkFn = Callable[[list[LinkQuery], float | None], BatchOutcome]


@dataclass(eq=False)
class _Entry:
    queries: list[LinkQuery]
    kind: Kind
    deadline: float | None
    enqueued: float
    waiter: threading.Condition | None = None  # the caller's own, on the batcher's lock: wakes that thread alone
    state: Literal["queued", "running", "done"] = "queued"
    taken: bool = False  # went into a batch (reached the model)
    outcome: BatchOutcome | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class Ticket:
    """Lets the request's async side withdraw its entry while it is still queued (client gone, deadline)."""

    batcher: MicroBatcher
    entry: _Entry | None = None
    withdrawn: bool = False

    def withdraw(self) -> bool:
        """Drop the entry if it has not reached the model; True when it never will."""
        return self.batcher._withdraw(self)


class MicroBatcher:
    def __init__(self, link: LinkFn, metrics: Metrics, *, max_batch: int = 32, max_wait_ms: float = 2.0,
                 max_concurrent: int = 2, job_max_batch: int = 8, job_max_yield_ms: float = 200.0,
                 job_idle_batch: int | None = None, wait_when_idle: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._link = link
        self.metrics = metrics
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000
        self.max_concurrent = max_concurrent
        self.wait_when_idle = wait_when_idle
        self.job_max_batch, self.job_max_yield_s = job_max_batch, job_max_yield_ms / 1000
        self.job_idle_batch = job_max_batch if job_idle_batch is None else max(job_idle_batch, job_max_batch)
        self._clock = clock
        self._lock = threading.Lock()
        self._leader: threading.Condition | None = None  # the forming leader's waiter
        self._queues: dict[Kind, deque[_Entry]] = {k: deque() for k in KINDS}
        self._running: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._forming = False  # a leader is collecting a batch
        self._job_free_since = 0.0  # when the last job batch ended: the job's yield is counted from then
        self._interactive_seen = float("-inf")  # when an interactive batch last ended

    @classmethod
    def from_settings(cls, cfg: BatchingSettings, link: LinkFn, metrics: Metrics) -> MicroBatcher:
        """Disabled batching still goes through here (same concurrency cap, priorities and job batches); only
        interactive requests are no longer coalesced or kept waiting."""
        return cls(link, metrics, max_batch=cfg.max_batch if cfg.enabled else 1,
                   max_wait_ms=cfg.max_wait_ms if cfg.enabled else 0.0, max_concurrent=cfg.max_concurrent,
                   job_max_batch=cfg.job_max_batch, job_max_yield_ms=cfg.job_max_yield_ms,
                   job_idle_batch=cfg.job_idle_batch, wait_when_idle=cfg.wait_when_idle)

    # ---- callers (worker threads) ----

    def ticket(self) -> Ticket:
        return Ticket(self)

    @property
    def queued(self) -> dict[Kind, int]:
        with self._lock:
            return {k: len(q) for k, q in self._queues.items()}

    def link(self, queries: list[LinkQuery], *, deadline: float | None = None,
             ticket: Ticket | None = None) -> BatchOutcome:
        """One interactive request's mentions, linked together in some batch: its own results, in order."""
        (entry,) = self._submit([queries], "interactive", deadline, ticket)
        self._serve([entry])
        if entry.error is not None:
            raise entry.error
        assert entry.outcome is not None
        return entry.outcome

    def link_items(self, queries: list[LinkQuery]) -> list[LinkResult | Exception]:
        """A job chunk, one entry per item at job priority: each item's result, or the exception it alone raised."""
        entries = self._submit([[q] for q in queries], "job", None, None)
        self._serve(entries)
        out: list[LinkResult | Exception] = []
        for e in entries:
            if isinstance(e.error, Exception):
                out.append(e.error)
            elif e.error is not None:
                raise e.error
            else:
                assert e.outcome is not None
                out.append(e.outcome.results[0])
        return out

    def _submit(self, groups: list[list[LinkQuery]], kind: Kind, deadline: float | None,
                ticket: Ticket | None) -> list[_Entry]:
        now = self._clock()
        waiter = threading.Condition(self._lock)
        entries = [_Entry(g, kind, deadline, now, waiter) for g in groups]
        with self._lock:
            if ticket is not None:
                ticket.entry = entries[0]
                if ticket.withdrawn:  # gave up while decoding
                    self._finish(entries[0], error=ClientDisconnected("request withdrawn before it was queued"))
                    return entries
            self._queues[kind].extend(entries)
            self._kick()
        return entries

    def _serve(self, mine: list[_Entry]) -> None:
        """Wait until every entry of mine is done, leading batches (anyone's) while one of mine is queued."""
        waiter = mine[0].waiter
        assert waiter is not None
        with self._lock:
            while True:
                now = self._clock()
                self._expire(now)
                if all(e.state == "done" for e in mine):
                    return
                if (not self._forming and sum(self._running.values()) < self.max_concurrent
                        and any(e.state == "queued" for e in mine)):
                    batch = self._lead(waiter)
                    if batch:
                        self._run_unlocked(batch)
                    continue
                deadlines = [e.deadline for e in mine if e.state == "queued" and e.deadline is not None]
                timeout = max(min(deadlines) - now, 0.0) if deadlines else _RECHECK_S
                waiter.wait(min(timeout, _RECHECK_S))

    # ---- the leader (holds the lock except while it waits or runs) ----

    def _lead(self, waiter: threading.Condition) -> list[_Entry]:
        self._forming, self._leader = True, waiter
        try:
            while True:
                now = self._clock()
                self._expire(now)
                kind, start_at = self._plan(now)
                if kind is None:
                    return []
                if start_at <= now:
                    return self._take(kind, now)
                waiter.wait(start_at - now)
        finally:
            self._forming, self._leader = False, None
            self._kick()

    def _plan(self, now: float) -> tuple[Kind | None, float]:
        """Which kind of batch goes next, and when it may start."""
        inter = self._queues["interactive"]
        if inter:
            if sum(len(e.queries) for e in inter) >= self.max_batch:
                return "interactive", now
            if not self.wait_when_idle and not any(self._running.values()):
                # Nothing runs: no batch is about to free a slot, so company gathers while this one runs (the
                # next leader takes whatever queued meanwhile); waiting would only add max_wait to a lone request.
                return "interactive", now
            # Waiting for company never spends more than half the time a queued request had left on arrival,
            # so the batch always starts well before the earliest deadline.
            latest = min((e.enqueued + (e.deadline - e.enqueued) / 2 for e in inter if e.deadline is not None),
                         default=float("inf"))
            return "interactive", min(inter[0].enqueued + self.max_wait_s, latest)
        jobs = self._queues["job"]
        if jobs:
            # Yield, for a bounded time, to interactive work running now or lately: a client that sends its next
            # request as soon as it has an answer leaves gaps of a few ms, and a job batch that slipped into every
            # gap would share the CPU with nearly every request.
            if self._interactive_about(now):
                return "job", max(jobs[0].enqueued, self._job_free_since) + self.job_max_yield_s
            return "job", now
        return None, now

    def _interactive_about(self, now: float, window: float = 1.0) -> bool:
        """Interactive work queued, running, or ended within `window` x job_max_yield_ms."""
        return bool(self._queues["interactive"] or self._running["interactive"]
                    or now - self._interactive_seen < window * self.job_max_yield_s)

    def _take(self, kind: Kind, now: float) -> list[_Entry]:
        if kind == "interactive":
            cap = self.max_batch
        else:  # big only after a quiet spell: sparse requests (one every few hundred ms) keep job batches small
            cap = self.job_max_batch if self._interactive_about(now, JOB_IDLE_AFTER) else self.job_idle_batch
        queue = self._queues[kind]
        batch = [queue.popleft()]  # at least one entry, even one larger than the cap
        size = len(batch[0].queries)
        while queue and size + len(queue[0].queries) <= cap:
            batch.append(queue.popleft())
            size += len(batch[-1].queries)
        for e in batch:
            e.state, e.taken = "running", True
            self.metrics.batch_queue_wait.labels(kind).observe(max(now - e.enqueued, 0.0))
        self.metrics.batch_size.labels(kind).observe(size)
        return batch

    def _run_unlocked(self, batch: list[_Entry]) -> None:
        kind = batch[0].kind
        self._running[kind] += 1
        self._lock.release()
        outcomes: list[tuple[BatchOutcome | None, BaseException | None]] = []
        try:
            outcomes = self._run(batch)
        finally:
            self._lock.acquire()
            self._running[kind] -= 1
            if kind == "job":
                self._job_free_since = self._clock()
            else:
                self._interactive_seen = self._clock()
            for i, e in enumerate(batch):
                if i < len(outcomes):
                    self._finish(e, *outcomes[i])
                else:  # only on a BaseException (interpreter shutdown): never leave a caller waiting
                    self._finish(e, error=RuntimeError("batch abandoned"))
            self._kick()

    def _run(self, batch: list[_Entry]) -> list[tuple[BatchOutcome | None, BaseException | None]]:
        """One link_batch for the whole batch, split back per entry; on failure each entry again, alone."""
        queries = [q for e in batch for q in e.queries]
        deadlines = [e.deadline for e in batch]
        # The batch is abandoned only when nobody is left to answer; each request's own deadline is kept by
        # admission (its 504 comes at its deadline while the batch runs on).
        deadline = None if any(d is None for d in deadlines) else max(d for d in deadlines if d is not None)
        try:
            out = self._link(queries, deadline)
        except Exception as exc:  # noqa: BLE001 - handed to the callers, who raise it in their own threads
            if len(batch) == 1:
                return [(None, exc)]
            logger.warning("a batch of %d entries failed (%s); linking them one by one", len(batch),
                           type(exc).__name__)
            return [self._run_alone(e) for e in batch]
        self.metrics.observe_batch(out.timings_ms, out.ot_stats)
        split: list[tuple[BatchOutcome | None, BaseException | None]] = []
        start = 0
        for e in batch:
            n = len(e.queries)
            stats = out.ot_stats if len(batch) == 1 else []  # a batch's solver stats are not per request
            split.append((BatchOutcome(out.results[start:start + n], stats, dict(out.timings_ms)), None))
            start += n
        return split

    def _run_alone(self, e: _Entry) -> tuple[BatchOutcome | None, BaseException | None]:
        if e.deadline is not None and self._clock() >= e.deadline:
            return None, DeadlineExceeded("request deadline exceeded")
        try:
            out = self._link(e.queries, e.deadline)
        except Exception as exc:  # noqa: BLE001 - this entry's own error, raised by its caller
            return None, exc
        self.metrics.observe_batch(out.timings_ms, out.ot_stats)
        return out, None

    # ---- bookkeeping (under the lock) ----

    def _finish(self, e: _Entry, outcome: BatchOutcome | None = None, error: BaseException | None = None) -> None:
        e.outcome, e.error, e.state = outcome, error, "done"
        if e.waiter is not None:
            e.waiter.notify()

    def _kick(self) -> None:
        """Wake the one thread that can act now: the forming leader (new work, or a batch ended: re-plan), else
        the owner of the entry that goes next, to lead. Never every waiting thread: with dozens of requests
        queued, waking them all on each event would spend the CPU (and the GIL) the batches need."""
        if self._leader is not None:
            self._leader.notify()
            return
        if sum(self._running.values()) >= self.max_concurrent:
            return  # the batch that ends next kicks again
        for kind in KINDS:
            if self._queues[kind] and (waiter := self._queues[kind][0].waiter) is not None:
                waiter.notify()  # its owner may be busy running a batch: it looks again when that ends
                return

    def _expire(self, now: float) -> None:
        """Entries whose deadline passed while queued never run."""
        expired = False
        for queue in self._queues.values():
            if any(e.deadline is not None and e.deadline <= now for e in queue):
                keep = deque(e for e in queue if e.deadline is None or e.deadline > now)
                for e in queue:
                    if e.deadline is not None and e.deadline <= now:
                        self._finish(e, error=DeadlineExceeded("deadline passed while queued"))
                queue.clear()
                queue.extend(keep)
                expired = True
        if expired:
            self._kick()

    def _withdraw(self, ticket: Ticket) -> bool:
        with self._lock:
            e = ticket.entry
            if e is None:
                ticket.withdrawn = True
                return True
            if e.state != "queued":
                return not e.taken  # done without running (expired in the queue) counts as withdrawn
            self._queues[e.kind].remove(e)
            self._finish(e, error=ClientDisconnected("request withdrawn while queued"))
            self._kick()
            return True
