"""The job store alone, on a temporary SQLite file with a fake clock: idempotency, leases, attempts, expiry."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from service.errors import IdempotencyConflict, JobQueueFull
from service.jobs.store import ItemOutcome, JobStore

TTL = 100.0


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock):
    s = JobStore.open(tmp_path / "jobs.sqlite3", result_ttl_s=TTL, clock=clock)
    yield s
    s.close()


def items(n: int, prefix: str = "m") -> list[tuple[str, str]]:
    return [(f"{prefix}{i}", json.dumps({"id": f"{prefix}{i}", "mention": f"mention {i}"})) for i in range(n)]


def create(store: JobStore, n: int = 3, *, key: str | None = None, fp: str = "fp", max_queued: int = 100):
    return store.create_job(items(n), fingerprint=fp, idempotency_key=key, max_queued=max_queued)


def ok(seq: int, item_id: str, value: str = "x") -> ItemOutcome:
    return ItemOutcome(seq, item_id, result=json.dumps({"v": value}))


def rows(store: JobStore, table: str, job_id: str) -> int:
    with sqlite3.connect(store.path) as c:
        return c.execute(f"SELECT count(*) FROM {table} WHERE job_id = ?", (job_id,)).fetchone()[0]


def test_file_is_wal_with_the_configured_sync(store: JobStore) -> None:
    c = store._conn()
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_create_persists_job_and_items_in_order(store: JobStore, clock: Clock) -> None:
    job, created = create(store, 4)
    assert created and job.state == "queued" and job.total == 4 and job.done == 0 and job.attempts == 0
    assert job.created_at == clock.t and job.expires_at is None
    again = JobStore.open(store.path, result_ttl_s=TTL)  # a second process sees it
    try:
        assert again.get(job.id) == job
        assert [p.item_id for p in again.pending(job.id, from_seq=0, limit=10)] == ["m0", "m1", "m2", "m3"]
    finally:
        again.close()


def test_same_key_same_body_is_the_same_job_and_other_body_conflicts(store: JobStore) -> None:
    first, created = create(store, key="k", fp="a")
    second, created2 = create(store, key="k", fp="a")
    assert created and not created2 and second.id == first.id
    with pytest.raises(IdempotencyConflict) as exc:
        create(store, key="k", fp="b")
    assert exc.value.status == 409 and exc.value.code == "idempotency_conflict"
    other, _ = create(store, fp="a")  # no key: a new job every time
    assert other.id != first.id


def test_concurrent_submissions_with_one_key_make_one_job(store: JobStore) -> None:
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        job, created = create(store, 50, key="same")
        results.append((job.id, created))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert rows(store, "items", results[0][0]) == 50


def test_queue_cap_refuses_with_retry_after_but_replays_still_answer(store: JobStore) -> None:
    first, _ = create(store, key="a", max_queued=2)
    create(store, key="b", max_queued=2)
    with pytest.raises(JobQueueFull) as exc:
        store.create_job(items(1), fingerprint="fp", idempotency_key="c", max_queued=2, retry_after_s=7)
    assert exc.value.status == 429 and exc.value.headers["Retry-After"] == "7"
    assert create(store, key="a", max_queued=2)[0].id == first.id


def test_claim_takes_the_oldest_and_leases_it(store: JobStore, clock: Clock) -> None:
    a, _ = create(store)
    clock.t += 1
    create(store)
    job = store.claim("w1", lease_s=10, max_attempts=3)
    assert job is not None and job.id == a.id and job.state == "running" and job.attempts == 1
    assert job.lease_owner == "w1" and job.lease_expires_at == clock.t + 10 and job.started_at == clock.t
    assert store.is_ours(a.id, "w1") and not store.is_ours(a.id, "w2")


def test_expired_lease_is_requeued_and_the_old_owner_can_no_longer_write(store: JobStore, clock: Clock) -> None:
    job, _ = create(store, 2)
    store.claim("w1", lease_s=10, max_attempts=3)
    clock.t += 5
    assert store.heartbeat(job.id, "w1", lease_s=10)  # renewed to t+10
    clock.t += 9
    assert store.requeue_expired() == 0
    clock.t += 2
    assert store.requeue_expired() == 1
    assert store.get(job.id).state == "queued"
    again = store.claim("w2", lease_s=10, max_attempts=3)
    assert again.id == job.id and again.attempts == 2 and again.lease_owner == "w2"
    assert not store.heartbeat(job.id, "w1", lease_s=10)
    assert not store.commit_chunk(job.id, "w1", [ok(0, "m0")], lease_s=10)
    assert rows(store, "results", job.id) == 0


def test_recover_requeues_running_jobs_of_dead_owners_only(store: JobStore) -> None:
    dead, _ = create(store)
    alive, _ = create(store)
    store.claim("dead-worker", lease_s=60, max_attempts=3)
    store.claim("live-worker", lease_s=60, max_attempts=3)
    assert store.recover(lambda owner: owner == "dead-worker") == 1
    assert store.get(dead.id).state == "queued" and "re-queued" in store.get(dead.id).error
    assert store.get(alive.id).state == "running"


def test_attempts_cap_marks_the_job_failed(store: JobStore, clock: Clock) -> None:
    job, _ = create(store)
    for attempt in (1, 2):
        claimed = store.claim("w", lease_s=10, max_attempts=2)
        assert claimed.attempts == attempt
        clock.t += 11
        store.requeue_expired()
    assert store.claim("w", lease_s=10, max_attempts=2) is None
    failed = store.get(job.id)
    assert failed.state == "failed" and failed.error.startswith("gave up after 2 attempt(s)")
    assert failed.finished_at == clock.t and failed.expires_at == clock.t + TTL


def test_clean_release_refunds_the_attempt(store: JobStore) -> None:
    job, _ = create(store)
    store.claim("w", lease_s=10, max_attempts=3)
    assert store.release(job.id, "w", refund=True)
    assert store.get(job.id).attempts == 0 and store.get(job.id).state == "queued"
    store.claim("w", lease_s=10, max_attempts=3)
    assert store.release(job.id, "w", error="boom")
    assert store.get(job.id).attempts == 1 and store.get(job.id).error == "boom"


def test_rerun_chunks_never_duplicate_results_and_progress_stays_exact(store: JobStore, clock: Clock) -> None:
    job, _ = create(store, 4)
    store.claim("w1", lease_s=10, max_attempts=3)
    err = ItemOutcome(1, "m1", error=json.dumps({"code": "invalid_image", "message": "bad"}))
    assert store.commit_chunk(job.id, "w1", [ok(0, "m0", "first"), err], lease_s=10)
    clock.t += 11  # the worker dies; another takes over and redoes the first chunk
    store.requeue_expired()
    store.claim("w2", lease_s=10, max_attempts=3)
    assert [p.seq for p in store.pending(job.id, from_seq=0, limit=10)] == [2, 3]
    assert store.commit_chunk(job.id, "w2", [ok(0, "m0", "second"), ok(1, "m1"), ok(2, "m2")], lease_s=10)
    assert store.commit_chunk(job.id, "w2", [ok(3, "m3")], lease_s=10)
    assert store.finish(job.id, "w2")
    done = store.get(job.id)
    assert (done.state, done.done, done.failed, done.total) == ("succeeded", 4, 1, 4)
    out = list(store.iter_outcomes(job.id))
    assert [o[1] for o in out] == ["m0", "m1", "m2", "m3"]
    assert json.loads(out[0][2]) == {"v": "first"} and out[1][2] is None and "invalid_image" in out[1][3]
    assert rows(store, "results", job.id) == 4


def test_cancel_stops_further_commits_and_is_a_no_op_once_finished(store: JobStore) -> None:
    job, _ = create(store, 3)
    store.claim("w", lease_s=10, max_attempts=3)
    assert store.commit_chunk(job.id, "w", [ok(0, "m0")], lease_s=10)
    cancelled = store.cancel(job.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None and cancelled.expires_at is not None
    assert not store.commit_chunk(job.id, "w", [ok(1, "m1")], lease_s=10)
    assert not store.finish(job.id, "w")
    assert rows(store, "results", job.id) == 1
    assert [(o[1], o[2] is not None) for o in store.iter_outcomes(job.id)] == [("m0", True), ("m1", False), ("m2", False)]
    other, _ = create(store, 1)
    store.claim("w", lease_s=10, max_attempts=3)
    store.commit_chunk(other.id, "w", [ok(0, "m0")], lease_s=10)
    store.finish(other.id, "w")
    assert store.cancel(other.id).state == "succeeded"


def test_delete_of_a_running_job_removes_every_row_and_stops_its_worker(store: JobStore) -> None:
    job, _ = create(store, 3, key="k")
    store.claim("w", lease_s=10, max_attempts=3)
    assert store.commit_chunk(job.id, "w", [ok(0, "m0")], lease_s=10)
    assert store.delete(job.id)
    assert store.get(job.id) is None
    for table in ("jobs", "items", "results"):
        with sqlite3.connect(store.path) as c:
            col = "id" if table == "jobs" else "job_id"
            assert c.execute(f"SELECT count(*) FROM {table} WHERE {col} = ?", (job.id,)).fetchone()[0] == 0
    # The worker that was running it finds nothing to write to and nothing to finish or hand back.
    assert not store.commit_chunk(job.id, "w", [ok(1, "m1")], lease_s=10)
    assert not store.heartbeat(job.id, "w", lease_s=10) and not store.is_ours(job.id, "w")
    assert not store.finish(job.id, "w") and not store.release(job.id, "w")
    assert store.pending(job.id, from_seq=0, limit=10) == [] and rows(store, "results", job.id) == 0
    assert not store.delete(job.id)  # a second delete finds nothing
    again, created = create(store, 3, key="k")  # the key is free again
    assert created and again.id != job.id


def test_delete_of_a_finished_or_queued_job_leaves_other_jobs_alone(store: JobStore) -> None:
    done, _ = create(store, 2)
    store.claim("w", lease_s=10, max_attempts=3)
    store.commit_chunk(done.id, "w", [ok(0, "m0"), ok(1, "m1")], lease_s=10)
    store.finish(done.id, "w")
    queued, _ = create(store, 2)
    keep, _ = create(store, 2)
    assert store.delete(done.id) and store.delete(queued.id)
    assert store.get(done.id) is None and store.get(queued.id) is None
    assert store.get(keep.id).state == "queued" and rows(store, "items", keep.id) == 2
    assert store.claim("w", lease_s=10, max_attempts=3).id == keep.id


def test_expiry_then_sweep_removes_every_row(store: JobStore, clock: Clock) -> None:
    job, _ = create(store, 3, key="k")
    keep, _ = create(store, 1)
    store.claim("w", lease_s=10, max_attempts=3)
    store.commit_chunk(job.id, "w", [ok(i, f"m{i}") for i in range(3)], lease_s=10)
    store.finish(job.id, "w")
    assert not store.is_expired(store.get(job.id))
    clock.t += TTL + 1
    assert store.is_expired(store.get(job.id))
    assert store.sweep() == 1
    assert store.get(job.id) is None
    with sqlite3.connect(store.path) as c:
        assert c.execute("SELECT count(*) FROM jobs WHERE id = ?", (job.id,)).fetchone()[0] == 0
    for table in ("items", "results"):
        assert rows(store, table, job.id) == 0
    assert store.get(keep.id) is not None  # queued jobs never expire
    assert create(store, key="k")[1]  # the key is free again


def test_an_expired_but_unswept_key_starts_a_new_job(store: JobStore, clock: Clock) -> None:
    job, _ = create(store, 1, key="k")
    store.claim("w", lease_s=10, max_attempts=3)
    store.commit_chunk(job.id, "w", [ok(0, "m0")], lease_s=10)
    store.finish(job.id, "w")
    clock.t += TTL + 1
    fresh, created = create(store, 1, key="k", fp="other")
    assert created and fresh.id != job.id and store.get(job.id) is None


def test_counts_and_recent(store: JobStore, clock: Clock) -> None:
    a, _ = create(store)
    clock.t += 1
    b, _ = create(store)
    store.claim("w", lease_s=10, max_attempts=3)
    assert store.counts() == {"queued": 1, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert [j.id for j in store.recent(10)] == [b.id, a.id]
    assert [j.id for j in store.recent(10, "running")] == [a.id]


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        JobStore.open(path, result_ttl_s=TTL)
