"""Admission control: a bounded number of requests in the pipeline, a bounded queue, deadlines.

Beyond the queue cap a request is refused at once (429 + Retry-After). A request whose deadline
passes while it waits never reaches the model (504). Work runs in a worker thread (ONNX Runtime and
torch release the GIL), so the event loop stays free for /healthz and new arrivals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import anyio

from service.errors import DeadlineExceeded, Overloaded
from service.metrics import Metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Admission:
    def __init__(self, *, max_in_flight: int, max_queue: int, timeout_s: float, retry_after_s: int,
                 metrics: Metrics) -> None:
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s
        self.metrics = metrics
        self._slots = asyncio.Semaphore(max_in_flight)
        self._limiter = anyio.CapacityLimiter(max_in_flight)
        self.waiting = 0
        self.running = 0

    def _reject(self, reason: str) -> Overloaded:
        self.metrics.rejections.labels(reason).inc()
        return Overloaded("server is at capacity, retry later", headers={"Retry-After": str(self.retry_after_s)})

    async def run(self, fn: Callable[[], T], *, timeout_s: float | None = None) -> T:
        """Run fn in a worker thread once a slot is free, within the deadline."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise self._reject("queue_full")
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=max(deadline - time.monotonic(), 0))
        except TimeoutError:
            self.metrics.rejections.labels("deadline_queued").inc()
            raise DeadlineExceeded("deadline passed while queued") from None
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        try:
            if time.monotonic() >= deadline:
                self.metrics.rejections.labels("deadline_queued").inc()
                raise DeadlineExceeded("deadline passed while queued")
            self.running += 1
            self.metrics.in_flight.set(self.running)
            try:
                # The thread cannot be interrupted; on timeout the client gets 504 and the slot frees when it ends.
                return await asyncio.wait_for(anyio.to_thread.run_sync(fn, limiter=self._limiter),
                                              timeout=max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                self.metrics.rejections.labels("deadline_running").inc()
                raise DeadlineExceeded("request deadline exceeded") from None
            finally:
                self.running -= 1
                self.metrics.in_flight.set(self.running)
        finally:
            self._slots.release()
