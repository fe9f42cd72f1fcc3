"""Admission in-process, no model: the caps, FIFO hand-over, deadlines and disconnects, with exact counts."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.admission import Admission
from service.errors import ClientDisconnected, DeadlineExceeded, Overloaded
from service.metrics import Metrics


def admission(in_flight: int = 1, queue: int = 2, timeout_s: float = 5.0) -> Admission:
    return Admission(max_in_flight=in_flight, max_queue=queue, timeout_s=timeout_s, retry_after_s=1, metrics=Metrics())


def rejections(adm: Admission, reason: str) -> float:
    return adm.metrics.rejections.labels(reason)._value.get()


class Work:
    """A callable that records its calls and blocks until released (or for a fixed time)."""

    def __init__(self, hold_s: float | None = None) -> None:
        self.calls: list[int] = []
        self.release = threading.Event()
        self.hold_s = hold_s

    def __call__(self, tag: int = 0) -> int:
        self.calls.append(tag)
        if self.hold_s is None:
            self.release.wait(10)
        else:
            time.sleep(self.hold_s)
        return tag


def test_same_turn_burst_is_capped_and_served_in_arrival_order() -> None:
    async def main() -> tuple[list[object], list[int]]:
        adm = admission(in_flight=1, queue=2)
        order: list[int] = []

        def job(i: int) -> int:
            order.append(i)
            time.sleep(0.02)
            return i

        out = await asyncio.gather(*(adm.run(lambda i=i: job(i)) for i in range(6)), return_exceptions=True)
        assert rejections(adm, "queue_full") == 3
        assert adm.waiting == 0 and adm.running == 0
        return out, order

    out, order = asyncio.run(main())
    assert out[:3] == [0, 1, 2]
    assert all(isinstance(r, Overloaded) and r.headers == {"Retry-After": "1"} for r in out[3:])
    assert order == [0, 1, 2]  # FIFO


def test_expired_in_queue_never_runs() -> None:
    async def main() -> None:
        adm = admission(in_flight=1, queue=2)
        holder, queued = Work(hold_s=0.3), Work(hold_s=0.0)
        first = asyncio.create_task(adm.run(holder))
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
            await adm.run(queued, timeout_s=0.1)
        assert await first == 0
        assert queued.calls == [] and rejections(adm, "deadline_queued") == 1
        assert await adm.run(lambda: 7) == 7  # the slot came back

    asyncio.run(main())


def test_running_deadline_answers_on_time_and_keeps_the_slot_until_the_work_ends() -> None:
    async def main() -> None:
        adm = admission(in_flight=1, queue=0)
        slow = Work()
        # `slow` blocks until released below (or 10 s): the 504 can only come from the deadline, not the work's end.
        with pytest.raises(DeadlineExceeded, match="request deadline exceeded"):
            await adm.run(slow, timeout_s=0.1)
        assert not slow.release.is_set() and slow.calls == [0]
        assert adm.running == 1 and rejections(adm, "deadline_running") == 1
        with pytest.raises(Overloaded):  # the abandoned work still holds the only slot, and the queue cap is 0
            await adm.run(lambda: 1)
        slow.release.set()
        give_up = time.monotonic() + 30  # only a hung worker thread comes near this
        while adm.running and time.monotonic() < give_up:
            await asyncio.sleep(0.01)
        assert await adm.run(lambda: 2) == 2

    asyncio.run(main())


def test_pipeline_deadline_is_counted_too() -> None:
    def noticed() -> None:
        raise DeadlineExceeded("request deadline exceeded")

    async def main() -> None:
        adm = admission()
        with pytest.raises(DeadlineExceeded):
            await adm.run(noticed)
        assert rejections(adm, "deadline_running") == 1 and adm.running == 0

    asyncio.run(main())


def test_client_gone_while_queued_is_dropped_before_the_work() -> None:
    async def main() -> None:
        adm = admission(in_flight=1, queue=2)
        holder, dropped = Work(), Work(hold_s=0.0)
        gone = asyncio.Event()
        first = asyncio.create_task(adm.run(holder))
        second = asyncio.create_task(adm.run(dropped, disconnected=gone.wait))
        await asyncio.sleep(0.05)
        assert adm.waiting == 1
        gone.set()
        with pytest.raises(ClientDisconnected):
            await second
        assert adm.waiting == 0 and rejections(adm, "client_disconnected") == 1
        holder.release.set()
        assert await first == 0
        assert dropped.calls == []
        assert await adm.run(lambda: 3, disconnected=asyncio.Event().wait) == 3  # a present client runs

    asyncio.run(main())


def test_a_watcher_that_fails_does_not_drop_the_request() -> None:
    async def broken() -> None:
        raise RuntimeError("receive channel closed")

    async def main() -> None:
        adm = admission(in_flight=1, queue=1)
        holder = Work(hold_s=0.1)
        first = asyncio.create_task(adm.run(holder))
        await asyncio.sleep(0.01)
        assert await adm.run(lambda: 5, disconnected=broken) == 5
        assert await first == 0

    asyncio.run(main())


def test_client_gone_while_its_work_waits_in_the_batcher_is_dropped_when_withdrawn() -> None:
    """With the micro-batcher's `withdraw` hook, the client is watched while the admitted work waits for its
    batch: if it leaves and the work can still be withdrawn, the request is dropped (and counted) at once."""

    async def main() -> None:
        adm = admission(in_flight=2, queue=0)
        waiting = Work()  # stands for work queued in the batcher: blocks until released
        gone = asyncio.Event()
        calls: list[str] = []

        def withdraw() -> bool:
            calls.append("withdraw")
            return True

        task = asyncio.create_task(adm.run(waiting, disconnected=gone.wait, withdraw=withdraw))
        await asyncio.sleep(0.05)
        gone.set()
        with pytest.raises(ClientDisconnected):
            await task
        assert calls == ["withdraw"] and rejections(adm, "client_disconnected") == 1
        waiting.release.set()
        give_up = time.monotonic() + 30
        while adm.running and time.monotonic() < give_up:
            await asyncio.sleep(0.01)
        assert adm.running == 0

    asyncio.run(main())


def test_client_gone_after_its_batch_started_still_gets_the_work_finished() -> None:
    async def main() -> None:
        adm = admission(in_flight=2, queue=0)
        running = Work()
        gone = asyncio.Event()
        task = asyncio.create_task(adm.run(running, disconnected=gone.wait, withdraw=lambda: False))
        await asyncio.sleep(0.05)
        gone.set()
        await asyncio.sleep(0.05)
        assert not task.done()  # already in the model: the answer is still awaited
        running.release.set()
        assert await task == 0
        assert rejections(adm, "client_disconnected") == 0

    asyncio.run(main())


def test_a_deadline_withdraws_work_still_queued_in_the_batcher() -> None:
    async def main() -> None:
        adm = admission(in_flight=2, queue=0)
        waiting = Work()
        calls: list[str] = []

        def withdraw() -> bool:
            calls.append("withdraw")
            return True

        with pytest.raises(DeadlineExceeded, match="request deadline exceeded"):
            await adm.run(waiting, timeout_s=0.1, withdraw=withdraw)
        assert calls == ["withdraw"] and rejections(adm, "deadline_running") == 1
        waiting.release.set()

    asyncio.run(main())
