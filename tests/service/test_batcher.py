"""The micro-batcher (service/batcher.py) over a fake link function: coalescing proved by counting link_batch
calls, per-entry results and errors, deadlines while queued, withdrawal, priorities and snapshot consistency.

Concurrency is made deterministic with a gate: the first batch is held in the model until the test has seen the
others queue up (`batcher.queued`), so what the next batch holds does not depend on timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from service.batcher import MicroBatcher, _Entry
from service.errors import ClientDisconnected, DeadlineExceeded
from service.metrics import Metrics
from service.pipeline.linker import BatchOutcome
from service.pipeline.types import LinkQuery, LinkResult
from service.settings import BatchingSettings

GIVE_UP_S = 30.0  # only a hung batcher comes near this


def eventually(check: Callable[[], bool], what: str) -> None:
    give_up = time.monotonic() + GIVE_UP_S
    while not check():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.005)


class FakeLink:
    """Records each call's mentions; answers each mention with a result that names it and the call's index
    version (bumped after every call, as a hot swap between two batches would). `gate` holds the first call."""

    def __init__(self, *, bad: str | None = None, gate: threading.Event | None = None) -> None:
        self.calls: list[list[str]] = []
        self.bad, self.gate = bad, gate
        self.version = 0
        self._lock = threading.Lock()

    def __call__(self, queries: list[LinkQuery], deadline: float | None) -> BatchOutcome:
        with self._lock:
            self.calls.append([q.mention for q in queries])
            first = len(self.calls) == 1
            version = f"index@{self.version}"
            self.version += 1
        if first and self.gate is not None:
            assert self.gate.wait(GIVE_UP_S)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("request deadline exceeded")
        if self.bad is not None and any(q.mention == self.bad for q in queries):
            raise ValueError("this mention breaks the pipeline")
        results = [LinkResult(q.mention, [], True, version, "fake@0", id=q.id) for q in queries]
        return BatchOutcome(results, [], {"total": 1.0})

    @property
    def started(self) -> int:
        with self._lock:
            return len(self.calls)


def q(mention: str) -> LinkQuery:
    return LinkQuery(mention, "", None, top_k=1)


def make(link: FakeLink, **kwargs: object) -> MicroBatcher:
    opts: dict = {"max_batch": 32, "max_wait_ms": 0.0, "max_concurrent": 1, "job_max_batch": 8,
                  "job_max_yield_ms": 200.0, **kwargs}
    return MicroBatcher(link, Metrics(), **opts)


def held_then_queued(batcher: MicroBatcher, link: FakeLink, pool: ThreadPoolExecutor,
                     requests: list[list[str]]) -> list[Future[BatchOutcome]]:
    """Send a first request that the gate holds in the model, then `requests` (each a list of mentions), and
    wait until all of them are queued behind it. Returns the futures, the holder's first."""
    holder = pool.submit(batcher.link, [q("holder")])
    eventually(lambda: link.started == 1, "the holder to reach the model")
    futures = []
    for i, mentions in enumerate(requests):  # one at a time, so the queue order is the list's
        futures.append(pool.submit(batcher.link, [q(m) for m in mentions]))
        eventually(lambda i=i: batcher.queued["interactive"] == i + 1, "the request to queue")
    return [holder, *futures]


def test_concurrent_callers_share_one_link_batch_call_and_each_gets_its_own_results() -> None:
    link = FakeLink(gate=threading.Event())
    batcher = make(link)
    requests = [[f"m{i}"] for i in range(6)] + [["b0", "b1", "b2"]]  # six /v1/link and one /v1/link/batch
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        futures = held_then_queued(batcher, link, pool, requests)
        link.gate.set()  # type: ignore[union-attr]
        outcomes = [f.result(GIVE_UP_S) for f in futures]
    assert link.calls == [["holder"], [m for r in requests for m in r]]  # 8 requests, 2 calls
    for mentions, outcome in zip([["holder"], *requests], outcomes, strict=True):
        assert [r.mention for r in outcome.results] == mentions
    sizes = batcher.metrics.batch_size.labels("interactive")
    assert sizes._sum.get() == 10 and sum(b.get() for b in sizes._buckets) == 2


def test_max_batch_splits_the_queue_without_splitting_a_request() -> None:
    link = FakeLink(gate=threading.Event())
    batcher = make(link, max_batch=4)
    requests = [["a"], ["b", "c"], ["d", "e"], ["f"]]
    with ThreadPoolExecutor(5) as pool:
        futures = held_then_queued(batcher, link, pool, requests)
        link.gate.set()  # type: ignore[union-attr]
        for f in futures:
            f.result(GIVE_UP_S)
    assert link.calls == [["holder"], ["a", "b", "c"], ["d", "e", "f"]]


def test_disabled_batching_runs_each_request_alone() -> None:
    link = FakeLink(gate=threading.Event())
    batcher = MicroBatcher.from_settings(BatchingSettings(enabled=False, max_concurrent=1), link, Metrics())
    with ThreadPoolExecutor(4) as pool:
        futures = held_then_queued(batcher, link, pool, [["a"], ["b"], ["c"]])
        link.gate.set()  # type: ignore[union-attr]
        for f in futures:
            f.result(GIVE_UP_S)
    assert link.calls == [["holder"], ["a"], ["b"], ["c"]]


def test_a_bad_request_fails_alone_and_its_neighbours_are_answered() -> None:
    link = FakeLink(bad="poison", gate=threading.Event())
    batcher = make(link)
    with ThreadPoolExecutor(4) as pool:
        futures = held_then_queued(batcher, link, pool, [["a"], ["poison"], ["c"]])
        link.gate.set()  # type: ignore[union-attr]
        assert [r.mention for r in futures[1].result(GIVE_UP_S).results] == ["a"]
        with pytest.raises(ValueError, match="breaks the pipeline"):
            futures[2].result(GIVE_UP_S)
        assert [r.mention for r in futures[3].result(GIVE_UP_S).results] == ["c"]
    # the shared call failed, then each request ran alone
    assert link.calls == [["holder"], ["a", "poison", "c"], ["a"], ["poison"], ["c"]]


def test_job_items_fail_alone() -> None:
    link = FakeLink(bad="poison")
    out = make(link).link_items([q("a"), q("poison"), q("c")])
    assert isinstance(out[1], ValueError)
    assert [r.mention for r in (out[0], out[2])] == ["a", "c"]  # type: ignore[union-attr]
    assert link.calls == [["a", "poison", "c"], ["a"], ["poison"], ["c"]]


def test_a_deadline_that_passes_while_queued_never_reaches_the_model() -> None:
    link = FakeLink(gate=threading.Event())
    batcher = make(link)
    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(batcher.link, [q("holder")])
        eventually(lambda: link.started == 1, "the holder to reach the model")
        with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
            batcher.link([q("late")], deadline=time.monotonic() + 0.05)
        assert batcher.queued["interactive"] == 0
        link.gate.set()  # type: ignore[union-attr]
        holder.result(GIVE_UP_S)
    assert link.calls == [["holder"]]


def test_the_leader_never_waits_past_a_queued_deadline() -> None:
    """max_wait is far longer than the request's deadline: the batch must start before the deadline, or the
    fake answers DeadlineExceeded (a batch that started after it)."""
    link = FakeLink()
    batcher = make(link, max_wait_ms=60_000.0)
    outcome = batcher.link([q("alone")], deadline=time.monotonic() + 0.5)
    assert [r.mention for r in outcome.results] == ["alone"]


def test_a_withdrawn_request_is_dropped_before_the_model() -> None:
    link = FakeLink(gate=threading.Event())
    batcher = make(link)
    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(batcher.link, [q("holder")])
        eventually(lambda: link.started == 1, "the holder to reach the model")
        ticket = batcher.ticket()
        gone = pool.submit(batcher.link, [q("gone")], ticket=ticket)
        eventually(lambda: batcher.queued["interactive"] == 1, "the request to queue")
        assert ticket.withdraw() is True
        with pytest.raises(ClientDisconnected):
            gone.result(GIVE_UP_S)
        link.gate.set()  # type: ignore[union-attr]
        holder.result(GIVE_UP_S)
    assert link.calls == [["holder"]]
    # a request already in the model cannot be withdrawn
    ran = batcher.ticket()
    batcher.link([q("ran")], ticket=ran)
    assert ran.withdraw() is False


def test_interactive_requests_go_before_queued_job_items() -> None:
    link = FakeLink(gate=threading.Event())
    batcher = make(link, job_max_batch=2)
    with ThreadPoolExecutor(4) as pool:
        holder = pool.submit(batcher.link, [q("holder")])
        eventually(lambda: link.started == 1, "the holder to reach the model")
        job = pool.submit(batcher.link_items, [q(f"j{i}") for i in range(4)])
        eventually(lambda: batcher.queued["job"] == 4, "the job items to queue")
        later = []
        for i, m in enumerate(("x", "y")):
            later.append(pool.submit(batcher.link, [q(m)]))
            eventually(lambda i=i: batcher.queued["interactive"] == i + 1, "the request to queue")
        link.gate.set()  # type: ignore[union-attr]
        holder.result(GIVE_UP_S)
        assert [r.mention for r in job.result(GIVE_UP_S)] == ["j0", "j1", "j2", "j3"]  # type: ignore[union-attr]
        for f in later:
            f.result(GIVE_UP_S)
    # the requests that came after the job still went first; the job went in batches of job_max_batch
    assert link.calls == [["holder"], ["x", "y"], ["j0", "j1"], ["j2", "j3"]]
    assert batcher.metrics.batch_size.labels("job")._sum.get() == 4


def test_each_batch_is_answered_from_one_index_snapshot() -> None:
    """The fake's index version changes between calls (a hot swap between two batches): every request of a
    batch, and every mention of a request, carries the version of the one call that answered it."""
    link = FakeLink(gate=threading.Event())
    batcher = make(link, max_batch=4)
    requests = [["a", "b"], ["c"], ["d"], ["e", "f", "g"]]
    with ThreadPoolExecutor(5) as pool:
        futures = held_then_queued(batcher, link, pool, requests)
        link.gate.set()  # type: ignore[union-attr]
        outcomes = [f.result(GIVE_UP_S) for f in futures]
    assert link.calls == [["holder"], ["a", "b", "c", "d"], ["e", "f", "g"]]
    versions = [{r.index_version for r in o.results} for o in outcomes]
    assert versions == [{"index@0"}, {"index@1"}, {"index@1"}, {"index@1"}, {"index@2"}]


def test_queue_wait_is_observed_per_request() -> None:
    link = FakeLink()
    batcher = make(link)
    batcher.link([q("a")])
    batcher.link_items([q("b"), q("c")])
    wait = batcher.metrics.batch_queue_wait
    assert sum(b.get() for b in wait.labels("interactive")._buckets) == 1
    assert sum(b.get() for b in wait.labels("job")._buckets) == 2


def test_a_job_batch_yields_to_interactive_work_that_ran_lately() -> None:
    """Right after an interactive request, a job item waits (up to job_max_yield_ms) rather than taking the gap
    before the next request: the request sent after the job item still goes first. The yield (2 s) only bounds
    how long the test takes; the request is sent as soon as the job item is queued."""
    link = FakeLink()
    batcher = make(link, job_max_yield_ms=2000.0)
    batcher.link([q("first")])
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(batcher.link_items, [q("j0")])
        eventually(lambda: batcher.queued["job"] == 1, "the job item to queue")
        batcher.link([q("next")])
        assert [r.mention for r in job.result(GIVE_UP_S)] == ["j0"]  # type: ignore[union-attr]
    assert link.calls == [["first"], ["next"], ["j0"]]


def test_a_job_runs_at_once_when_no_interactive_work_was_seen() -> None:
    link = FakeLink()
    out = make(link, job_max_yield_ms=60_000.0).link_items([q("j0"), q("j1")])
    assert [r.mention for r in out] == ["j0", "j1"]  # type: ignore[union-attr]


def test_a_request_that_finds_the_pipeline_idle_starts_at_once() -> None:
    """The leader's plan for one queued request (max_wait a minute): with nothing running it starts now, unless
    wait_when_idle; while a batch runs it waits for company either way."""
    for wait_when_idle, idle_start in ((False, 0.0), (True, 60.0)):
        batcher = make(FakeLink(), max_wait_ms=60_000.0, wait_when_idle=wait_when_idle)
        batcher._queues["interactive"].append(_Entry([q("alone")], "interactive", None, enqueued=0.0))
        assert batcher._plan(0.0) == ("interactive", idle_start)
        batcher._running["job"] = 1  # any batch running frees a slot soon: company may gather meanwhile
        assert batcher._plan(0.0) == ("interactive", 60.0)
    answered = make(FakeLink(), max_wait_ms=60_000.0).link([q("alone")])  # and it is answered, not kept waiting
    assert [r.mention for r in answered.results] == ["alone"]


def test_a_job_alone_goes_in_big_batches_and_small_ones_while_requests_are_about() -> None:
    """No interactive work seen: job items go job_idle_batch at a time (the batched speed). Requests queued, running
    or ended within JOB_IDLE_AFTER yields: job_max_batch, so a request shares the CPU only briefly with a job."""
    from service.batcher import JOB_IDLE_AFTER

    link = FakeLink()
    batcher = make(link, job_max_batch=2, job_idle_batch=4, job_max_yield_ms=1000.0)
    batcher.link_items([q(f"j{i}") for i in range(10)])
    assert [len(c) for c in link.calls] == [4, 4, 2]

    def cap(now: float) -> int:
        batcher._queues["job"].extend(_Entry([q(f"k{i}")], "job", None, enqueued=now) for i in range(6))
        try:
            taken = batcher._take("job", now)
            batcher._running["job"] = 0
            return len(taken)
        finally:
            batcher._queues["job"].clear()

    batcher._interactive_seen = 100.0  # a request ended at t = 100 s
    assert cap(100.5) == 2  # within one yield
    assert cap(100.0 + JOB_IDLE_AFTER - 0.1) == 2  # past the yield, still within the quiet spell: still small
    assert cap(100.0 + JOB_IDLE_AFTER + 0.1) == 4  # quiet long enough
    batcher._queues["interactive"].append(_Entry([q("r")], "interactive", None, enqueued=200.0))
    assert cap(300.0) == 2  # a queued request keeps it small however long ago the last one ended
