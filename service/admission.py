"""Admission control: a bounded number of requests in the pipeline, a bounded queue, deadlines.

- Beyond the queue cap a request is refused at once (429 + Retry-After, reason `queue_full`).
- A request whose deadline passes while it waits never reaches the model (504, `deadline_queued`).
- A request whose client disconnects while it waits is dropped (`client_disconnected`).
- A request whose deadline passes while it runs is answered 504 at the deadline (`deadline_running`); the
  worker thread cannot be interrupted, so its slot stays taken until the thread really ends: the caps count
  the work the CPU is doing, not the requests still waiting for an answer.
- The work of a /v1/link request waits in the micro-batcher (service/batcher.py) for its batch; a client that
  leaves, or a deadline that passes, while it waits there withdraws it before the model. The in-flight cap
  counts requests (queued in the batcher or running), not batches: the batcher caps the batches that run at
  once (EL_BATCHING__MAX_CONCURRENT, the CPU work), and admission has to let enough requests through to fill them.

Slots are counted here rather than with `asyncio.Semaphore`: the decision (run, queue or refuse) is taken
synchronously on arrival, so arrivals in the same event-loop turn cannot all slip past the caps, and a freed
slot is handed straight to the oldest waiter (FIFO, no queue jumping). Work runs in a worker thread (ONNX
Runtime and torch release the GIL), so the event loop stays free for /healthz and new arrivals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from service.errors import ClientDisconnected, DeadlineExceeded, Overloaded
from service.metrics import Metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Returns (completes) once the client has disconnected; cancelled when the request leaves the queue.
Disconnected = Callable[[], Awaitable[None]]
# Withdraws the work from the micro-batcher's queue; True when it has not reached the model (and never will).
Withdraw = Callable[[], bool]


class Admission:
    def __init__(self, *, max_in_flight: int, max_queue: int, timeout_s: float, retry_after_s: int,
                 metrics: Metrics) -> None:
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s
        self.metrics = metrics
        self._free = max_in_flight
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._limiter = anyio.CapacityLimiter(max_in_flight)
        self._abandoned: set[asyncio.Task] = set()
        self.running = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def deadline(self, timeout_s: float | None = None) -> float:
        """A `time.monotonic()` deadline this many seconds from now (default: the configured timeout)."""
        return time.monotonic() + (timeout_s or self.timeout_s)

    async def run(self, fn: Callable[[], T], *, timeout_s: float | None = None, deadline: float | None = None,
                  disconnected: Disconnected | None = None, withdraw: Withdraw | None = None) -> T:
        """Run fn in a worker thread once a slot is free, within the deadline.

        `deadline` (monotonic) wins over `timeout_s`. While the request is queued, `disconnected()` is awaited
        alongside the slot; if it completes first (the client went away), the request is dropped. With
        `withdraw` (the micro-batcher's hook), the client is also watched while fn waits in the batcher's queue:
        if it leaves and `withdraw()` says the work never reached the model, the request is dropped the same way.
        `withdraw()` is also called when the request stops waiting for fn (deadline, cancellation).
        """
        if deadline is None:
            deadline = self.deadline(timeout_s)
        await self._acquire(deadline, disconnected)
        if time.monotonic() >= deadline:
            self._release()
            raise self._expired_in_queue()
        work = asyncio.create_task(self._work(fn))
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None and withdraw is not None else None
        try:
            # asyncio.wait never cancels `work`: on timeout the client gets its 504 now, while the thread (and its
            # slot) runs to the end.
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.metrics.rejections.labels("deadline_running").inc()
                    raise DeadlineExceeded("request deadline exceeded")
                await asyncio.wait([f for f in (work, gone) if f is not None], timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
                if work.done():
                    return work.result()
                if gone is not None and gone.done():
                    left = not gone.cancelled() and gone.exception() is None
                    gone = None  # either way, stop watching: it either answered or can no longer tell
                    if left and withdraw is not None and withdraw():
                        withdraw = None  # done: the finally below has nothing left to withdraw
                        self.metrics.rejections.labels("client_disconnected").inc()
                        raise ClientDisconnected("client disconnected while queued")
        except DeadlineExceeded as exc:
            if work.done() and work.exception() is exc:  # the pipeline noticed first, between two stages
                self.metrics.rejections.labels("deadline_running").inc()
            raise
        finally:
            if gone is not None:
                gone.cancel()
            if not work.done():
                if withdraw is not None:
                    withdraw()  # still queued in the batcher: it never runs
                self._abandoned.add(work)
                work.add_done_callback(self._forget)

    async def _work(self, fn: Callable[[], T]) -> T:
        self.running += 1
        self.metrics.in_flight.set(self.running)
        try:
            return await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        finally:
            self.running -= 1
            self.metrics.in_flight.set(self.running)
            self._release()

    def _forget(self, task: asyncio.Task) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("abandoned work ended with %s", type(task.exception()).__name__)

    async def _acquire(self, deadline: float, disconnected: Disconnected | None) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self.max_queue:
            self.metrics.rejections.labels("queue_full").inc()
            raise Overloaded("server is at capacity, retry later", headers={"Retry-After": str(self.retry_after_s)})
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        self.metrics.queue_depth.set(self.waiting)
        # The watcher sleeps until the client goes away: no polling, so a deep queue costs no CPU.
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            while not slot.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._expired_in_queue()
                await asyncio.wait([f for f in (slot, gone) if f is not None], timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
                if slot.done() or gone is None or not gone.done():
                    continue
                if gone.cancelled() or gone.exception() is not None:
                    gone = None  # cannot tell any more: wait for the slot or the deadline only
                    continue
                self.metrics.rejections.labels("client_disconnected").inc()
                raise ClientDisconnected("client disconnected while queued")
        except BaseException:
            if slot.done() and not slot.cancelled():
                self._release()  # a slot was handed over just as we gave up: pass it on
            else:
                slot.cancel()
            raise
        finally:
            if gone is not None:
                gone.cancel()
            try:
                self._waiters.remove(slot)
            except ValueError:
                pass  # already handed a slot and popped by _release
            self.metrics.queue_depth.set(self.waiting)

    def _release(self) -> None:
        """Hand the slot to the oldest live waiter, else free it."""
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                self.metrics.queue_depth.set(self.waiting)
                return
        self._free += 1

    def _expired_in_queue(self) -> DeadlineExceeded:
        self.metrics.rejections.labels("deadline_queued").inc()
        return DeadlineExceeded("deadline passed while queued")
