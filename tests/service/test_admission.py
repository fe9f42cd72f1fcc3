"""Admission control in-process: the queue cap must hold even when arrivals share one event-loop turn."""

from __future__ import annotations

import asyncio
import threading
import time

from service.admission import Admission
from service.errors import Overloaded
from service.metrics import Metrics


def _burst(n: int, *, max_in_flight: int, max_queue: int, work_s: float) -> tuple[list[object], int]:
    """n admissions started in the same loop turn (asyncio.gather); returns outcomes and peak concurrency."""
    running = peak = 0
    lock = threading.Lock()

    def work() -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(work_s)
        with lock:
            running -= 1
        return "ok"

    async def main() -> list[object]:
        adm = Admission(max_in_flight=max_in_flight, max_queue=max_queue, timeout_s=10.0, retry_after_s=1,
                        metrics=Metrics())
        return await asyncio.gather(*(adm.run(work) for _ in range(n)), return_exceptions=True)

    return asyncio.run(main()), peak


def test_burst_in_separate_turns_respects_caps() -> None:
    """Six arrivals, each in its own loop turn, while the first is still running: one runs, one queues, four are
    refused. The work holds until every arrival has been answered or queued (an event, not a sleep: on a loaded
    machine a 5 ms gap between arrivals can outlast any fixed work time)."""
    release = threading.Event()

    async def main() -> list[object]:
        adm = Admission(max_in_flight=1, max_queue=1, timeout_s=10.0, retry_after_s=1, metrics=Metrics())
        tasks = []
        for _ in range(6):
            tasks.append(asyncio.create_task(adm.run(lambda: release.wait(10.0))))
            await asyncio.sleep(0.005)  # each arrival in its own turn
        await asyncio.sleep(0.05)  # let the refused ones finish; the admitted ones wait for the release
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = asyncio.run(main())
    assert sum(r is True for r in out) == 2, out
    rejected = [r for r in out if isinstance(r, Overloaded)]
    assert len(rejected) == 4
    assert all(r.headers == {"Retry-After": "1"} for r in rejected)


def test_same_turn_burst_respects_queue_cap() -> None:
    """Regression: on Python 3.11 `asyncio.wait_for(semaphore.acquire())` ran the acquire in a new task, so every
    arrival of one loop turn saw an unlocked semaphore and passed the queue-cap check (6 of 6 admitted)."""
    out, peak = _burst(6, max_in_flight=1, max_queue=1, work_s=0.05)
    assert peak == 1
    assert sum(r == "ok" for r in out) == 2, out
    assert sum(isinstance(r, Overloaded) for r in out) == 4, out
