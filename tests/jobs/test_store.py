"""The job store alone, on each backend (a temporary SQLite file; a fresh PostgreSQL database) with a fake
clock: idempotency, chunk leases, attempts, expiry, and several workers sharing one job."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from service.errors import IdempotencyConflict, JobQueueFull
from service.jobs.store import ChunkLease, ItemOutcome, JobStore, SqliteJobStore
from tests.jobs.db import JobDB

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
def db(make_db: Callable[..., JobDB]) -> JobDB:
    return make_db("store")


def open_store(db: JobDB, clock: Callable[[], float]) -> JobStore:
    if db.url is None:
        return SqliteJobStore.open(db.dir / "jobs.sqlite3", result_ttl_s=TTL, clock=clock)
    from service.jobs.store_pg import PostgresJobStore

    return PostgresJobStore.open(db.url, result_ttl_s=TTL, clock=clock)


@pytest.fixture
def store(db: JobDB, clock: Clock):
    s = open_store(db, clock)
    yield s
    s.close()


def items(n: int, prefix: str = "m") -> list[tuple[str, str]]:
    return [(f"{prefix}{i}", json.dumps({"id": f"{prefix}{i}", "mention": f"mention {i}"})) for i in range(n)]


def create(store: JobStore, n: int = 3, *, key: str | None = None, fp: str = "fp", max_queued: int = 100,
           chunk_size: int = 64):
    return store.create_job(items(n), fingerprint=fp, idempotency_key=key, max_queued=max_queued, chunk_size=chunk_size)


def ok(seq: int, item_id: str, value: str = "x") -> ItemOutcome:
    return ItemOutcome(seq, item_id, result=json.dumps({"v": value}))


def claim(store: JobStore, owner: str = "w", *, lease_s: float = 10, max_attempts: int = 3) -> ChunkLease:
    lease = store.claim(owner, lease_s=lease_s, max_attempts=max_attempts)
    assert lease is not None
    return lease


def finish(store: JobStore, lease: ChunkLease, value: str = "x") -> bool:
    """Commit every pending item of the chunk as a success."""
    return store.commit_chunk(lease, [ok(p.seq, p.item_id, value) for p in store.pending(lease)])


def rows(db: JobDB, table: str, job_id: str) -> int:
    return db.rows(f"SELECT count(*) FROM {table} WHERE job_id = ?", job_id)[0][0]


def test_sqlite_file_is_wal_with_the_configured_sync(store: JobStore, db: JobDB) -> None:
    if db.backend != "sqlite":
        pytest.skip("SQLite only")
    c = store._conn()
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_create_persists_job_items_and_chunks_in_order(store: JobStore, db: JobDB, clock: Clock) -> None:
    job, created = create(store, 5, chunk_size=2)
    assert created and job.state == "queued" and job.total == 5 and job.done == 0 and job.attempts == 0
    assert job.created_at == clock.t and job.expires_at is None
    assert db.rows("SELECT no, first_seq, last_seq, state, attempts FROM chunks WHERE job_id = ? ORDER BY no",
                   job.id) == [(0, 0, 1, "queued", 0), (1, 2, 3, "queued", 0), (2, 4, 4, "queued", 0)]
    again = open_store(db, clock)  # a second process sees it
    try:
        assert again.get(job.id) == job
        lease = claim(again)
        assert [p.item_id for p in again.pending(lease)] == ["m0", "m1"]
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


def test_concurrent_submissions_with_one_key_make_one_job(store: JobStore, db: JobDB) -> None:
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
    assert len(results) == 8
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert rows(db, "items", results[0][0]) == 50
    assert db.rows("SELECT count(*) FROM jobs") == [(1,)]


def test_queue_cap_refuses_with_retry_after_but_replays_still_answer(store: JobStore) -> None:
    first, _ = create(store, key="a", max_queued=2)
    create(store, key="b", max_queued=2)
    with pytest.raises(JobQueueFull) as exc:
        store.create_job(items(1), fingerprint="fp", idempotency_key="c", max_queued=2, retry_after_s=7)
    assert exc.value.status == 429 and exc.value.headers["Retry-After"] == "7"
    assert create(store, key="a", max_queued=2)[0].id == first.id


def test_claim_takes_the_oldest_jobs_first_chunk_and_leases_it(store: JobStore, clock: Clock) -> None:
    a, _ = create(store, 4, chunk_size=2)
    clock.t += 1
    create(store)
    lease = claim(store, "w1")
    assert (lease.job_id, lease.no, lease.first_seq, lease.last_seq, lease.attempts) == (a.id, 0, 0, 1, 1)
    job = store.get(a.id)
    assert job.state == "running" and job.attempts == 1 and job.lease_owner == "w1" and job.started_at == clock.t
    assert store.is_ours(lease) and not store.is_ours(ChunkLease(a.id, 0, 0, 1, 1, "w2"))
    second = claim(store, "w2")  # a second worker shares the same job: its next chunk
    assert (second.job_id, second.no) == (a.id, 1)


def test_several_workers_share_one_job_and_every_item_is_written_once(db: JobDB, clock: Clock) -> None:
    """Four workers (threads, each with its own store connection) drain one job of 40 chunks together."""
    first = open_store(db, clock)
    job, _ = create(first, 80, chunk_size=2)
    taken: dict[str, int] = {}

    def work(owner: str) -> None:
        s = open_store(db, clock)
        try:
            while (lease := s.claim(owner, lease_s=10, max_attempts=3)) is not None:
                assert finish(s, lease)
                taken[owner] = taken.get(owner, 0) + 1
        finally:
            s.close()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.close()
    assert sum(taken.values()) == 40
    assert db.rows("SELECT count(*), count(DISTINCT seq) FROM results WHERE job_id = ?", job.id) == [(80, 80)]
    assert db.rows("SELECT state, done, total FROM jobs WHERE id = ?", job.id) == [("succeeded", 80, 80)]
    assert db.rows("SELECT max(attempts) FROM chunks WHERE job_id = ?", job.id) == [(1,)]


def test_an_expired_chunk_lease_is_taken_over_and_the_old_owner_can_no_longer_write(
        store: JobStore, db: JobDB, clock: Clock) -> None:
    job, _ = create(store, 2)
    old = claim(store, "w1")
    clock.t += 5
    assert store.heartbeat(old, lease_s=10)  # renewed to t+10
    clock.t += 9
    assert store.claim("w2", lease_s=10, max_attempts=3) is None  # still leased
    clock.t += 2
    new = claim(store, "w2")
    assert (new.job_id, new.no, new.attempts, new.owner) == (job.id, 0, 2, "w2")
    assert store.get(job.id).attempts == 2 and store.get(job.id).lease_owner == "w2"
    assert not store.heartbeat(old, lease_s=10) and not store.is_ours(old)
    assert not store.commit_chunk(old, [ok(0, "m0")])
    assert rows(db, "results", job.id) == 0
    assert finish(store, new) and store.get(job.id).state == "succeeded"


def test_recover_requeues_chunks_of_dead_owners_only(store: JobStore) -> None:
    dead, _ = create(store)
    alive, _ = create(store)
    claim(store, "dead-worker", lease_s=60)
    claim(store, "live-worker", lease_s=60)
    assert store.recover(lambda owner: owner == "dead-worker") == 1
    assert store.get(dead.id).state == "queued" and "re-queued" in store.get(dead.id).error
    assert store.get(alive.id).state == "running"
    again = claim(store, "w")
    assert again.job_id == dead.id and again.attempts == 2


def test_attempts_cap_marks_the_job_failed(store: JobStore, clock: Clock) -> None:
    job, _ = create(store)
    for attempt in (1, 2):
        assert claim(store, max_attempts=2).attempts == attempt
        clock.t += 11  # the lease runs out: the worker died
    assert store.claim("w", lease_s=10, max_attempts=2) is None
    failed = store.get(job.id)
    assert failed.state == "failed" and failed.error.startswith("gave up after 2 attempt(s) of chunk 0")
    assert failed.finished_at == clock.t and failed.expires_at == clock.t + TTL


def test_release_refunds_a_clean_hand_back_and_counts_a_failure(store: JobStore) -> None:
    job, _ = create(store)
    lease = claim(store)
    assert store.release(lease, refund=True)
    assert store.get(job.id).attempts == 0 and store.get(job.id).state == "queued"
    lease = claim(store)
    assert store.release(lease, error="boom")
    assert store.get(job.id).attempts == 1 and store.get(job.id).error == "boom"
    assert not store.release(lease)  # no longer ours


def test_rerun_chunks_never_duplicate_results_and_progress_stays_exact(store: JobStore, db: JobDB,
                                                                       clock: Clock) -> None:
    job, _ = create(store, 4, chunk_size=3)
    first = claim(store, "w1")
    err = ItemOutcome(1, "m1", error=json.dumps({"code": "invalid_image", "message": "bad"}))
    assert store.commit_chunk(first, [ok(0, "m0", "first"), err, ok(2, "m2", "first")])
    # A chunk's results and its completion commit together; a worker that re-runs the chunk after it was
    # already written (a stale lease) is refused, and results are keyed by (job, seq) so nothing doubles.
    assert not store.commit_chunk(first, [ok(0, "m0", "again")])
    second = claim(store, "w2")
    assert second.no == 1 and [p.seq for p in store.pending(second)] == [3]
    clock.t += 11  # w2 dies mid-chunk; w3 takes the chunk over and writes it, w2's late commit is refused
    third = claim(store, "w3")
    assert (third.no, third.attempts) == (1, 2)
    assert store.commit_chunk(third, [ok(3, "m3")])
    assert not store.commit_chunk(second, [ok(3, "m3", "late")])
    done = store.get(job.id)
    assert (done.state, done.done, done.failed, done.total, done.attempts) == ("succeeded", 4, 1, 4, 2)
    out = list(store.iter_outcomes(job.id))
    assert [o[1] for o in out] == ["m0", "m1", "m2", "m3"]
    assert json.loads(out[0][2]) == {"v": "first"} and out[1][2] is None and "invalid_image" in out[1][3]
    assert rows(db, "results", job.id) == 4


def test_a_half_written_chunk_reruns_only_its_missing_items(store: JobStore, db: JobDB) -> None:
    """Results inserted by an earlier run of the chunk (rows keyed by (job, seq)) are neither redone nor doubled."""
    job, _ = create(store, 3)
    lease = claim(store)
    db.rows("INSERT INTO results (job_id, seq, item_id, result) VALUES (?, 0, 'm0', '{}') RETURNING seq", job.id)
    assert [p.seq for p in store.pending(lease)] == [1, 2]
    assert store.commit_chunk(lease, [ok(0, "m0", "dup"), ok(1, "m1"), ok(2, "m2")])
    assert store.get(job.id).done == 2  # the row already there was not counted again
    assert rows(db, "results", job.id) == 3


def test_cancel_stops_further_commits_and_is_a_no_op_once_finished(store: JobStore, db: JobDB) -> None:
    job, _ = create(store, 3, chunk_size=1)
    assert finish(store, claim(store))
    lease = claim(store)
    cancelled = store.cancel(job.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None and cancelled.expires_at is not None
    assert not store.commit_chunk(lease, [ok(1, "m1")])
    assert not store.heartbeat(lease, lease_s=10)
    assert store.claim("w", lease_s=10, max_attempts=3) is None  # nothing of a cancelled job is handed out
    assert rows(db, "results", job.id) == 1
    assert [(o[1], o[2] is not None) for o in store.iter_outcomes(job.id)] == [("m0", True), ("m1", False), ("m2", False)]
    other, _ = create(store, 1)
    assert finish(store, claim(store))
    assert store.cancel(other.id).state == "succeeded"


def test_a_cancel_between_choosing_a_chunk_and_leasing_it_stays_cancelled(store: JobStore, db: JobDB,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL locks only the chunk row while a worker leases it, so a cancel can commit in between: the job must
    stay cancelled and the worker lease nothing (setting the job running again brought it back to life, and its
    next chunks committed after the cancel had been answered)."""
    if db.url is None:
        pytest.skip("SQLite serialises writers: a cancel cannot commit inside a claim")
    from service.jobs import store_pg

    job, _ = create(store, 3, chunk_size=1)
    real = store_pg._PgTx.execute
    seen: list = []

    def execute(self, sql: str, args=()):
        if sql.startswith("UPDATE chunks SET state = 'running'") and not seen:  # chosen, not yet leased
            seen.append("chosen")
            t = threading.Thread(target=lambda: seen.append(store.cancel(job.id)))  # its own connection
            t.start()
            t.join(30)
        return real(self, sql, args)

    monkeypatch.setattr(store_pg._PgTx, "execute", execute)
    assert store.claim("w", lease_s=10, max_attempts=3) is None
    monkeypatch.undo()
    assert seen[0] == "chosen" and seen[1].state == "cancelled"
    assert store.get(job.id).state == "cancelled"
    assert store.claim("w", lease_s=10, max_attempts=3) is None  # and nothing of it is handed out later


def test_delete_of_a_running_job_removes_every_row_and_stops_its_worker(store: JobStore, db: JobDB) -> None:
    job, _ = create(store, 3, key="k", chunk_size=1)
    assert finish(store, claim(store))
    lease = claim(store)
    assert store.delete(job.id)
    assert store.get(job.id) is None
    assert db.rows("SELECT count(*) FROM jobs WHERE id = ?", job.id) == [(0,)]
    for table in ("items", "chunks", "results"):
        assert rows(db, table, job.id) == 0, table
    # The worker that was running it finds nothing to write to and nothing to hand back.
    assert not store.commit_chunk(lease, [ok(1, "m1")])
    assert not store.heartbeat(lease, lease_s=10) and not store.is_ours(lease)
    assert not store.release(lease)
    assert store.pending(lease) == [] and rows(db, "results", job.id) == 0
    assert not store.delete(job.id)  # a second delete finds nothing
    again, created = create(store, 3, key="k")  # the key is free again
    assert created and again.id != job.id


def test_delete_of_a_finished_or_queued_job_leaves_other_jobs_alone(store: JobStore, db: JobDB, clock: Clock) -> None:
    done, _ = create(store, 2)
    assert finish(store, claim(store))
    clock.t += 1
    queued, _ = create(store, 2)
    clock.t += 1
    keep, _ = create(store, 2)
    assert store.delete(done.id) and store.delete(queued.id)
    assert store.get(done.id) is None and store.get(queued.id) is None
    assert store.get(keep.id).state == "queued" and rows(db, "items", keep.id) == 2
    assert claim(store).job_id == keep.id


def test_expiry_then_sweep_removes_every_row(store: JobStore, db: JobDB, clock: Clock) -> None:
    job, _ = create(store, 3, key="k")
    clock.t += 1
    keep, _ = create(store, 1)
    assert finish(store, claim(store))
    assert store.get(job.id).state == "succeeded" and not store.is_expired(store.get(job.id))
    clock.t += TTL + 1
    assert store.is_expired(store.get(job.id))
    assert store.sweep() == 1
    assert store.get(job.id) is None
    assert db.rows("SELECT count(*) FROM jobs WHERE id = ?", job.id) == [(0,)]
    for table in ("items", "chunks", "results"):
        assert rows(db, table, job.id) == 0
    assert store.get(keep.id) is not None  # queued jobs never expire
    assert create(store, key="k")[1]  # the key is free again


def test_an_expired_but_unswept_key_starts_a_new_job(store: JobStore, clock: Clock) -> None:
    job, _ = create(store, 1, key="k")
    assert finish(store, claim(store))
    clock.t += TTL + 1
    fresh, created = create(store, 1, key="k", fp="other")
    assert created and fresh.id != job.id and store.get(job.id) is None


def test_park_returns_an_idle_running_job_to_the_queue(store: JobStore) -> None:
    job, _ = create(store, 2, chunk_size=1)
    lease = claim(store)
    assert not store.park(job.id)  # a chunk is leased: it stays running
    assert finish(store, lease)
    assert store.park(job.id) and store.get(job.id).state == "queued"
    assert finish(store, claim(store)) and store.get(job.id).state == "succeeded"


def test_counts_and_recent(store: JobStore, clock: Clock) -> None:
    a, _ = create(store)
    clock.t += 1
    b, _ = create(store)
    claim(store)
    assert store.counts() == {"queued": 1, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert [j.id for j in store.recent(10)] == [b.id, a.id]
    assert [j.id for j in store.recent(10, "running")] == [a.id]


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        SqliteJobStore.open(path, result_ttl_s=TTL)


def test_a_schema_1_file_is_migrated_to_chunk_leases(tmp_path: Path) -> None:
    """A store written before chunk leases: its running job resumes at its first item without an outcome."""
    path = tmp_path / "jobs.sqlite3"
    from service.jobs.store import SCHEMA

    with sqlite3.connect(path) as c:
        c.executescript(SCHEMA.format(real="REAL", extra_job_columns=""))
        c.execute("INSERT INTO jobs (id, state, fingerprint, total, done, attempts, lease_owner, created_at) "
                  "VALUES ('j', 'running', 'fp', 3, 1, 1, 'old', 1.0)")
        c.executemany("INSERT INTO items VALUES ('j', ?, ?, '{}')", [(i, f"m{i}") for i in range(3)])
        c.execute("INSERT INTO results (job_id, seq, item_id, result) VALUES ('j', 0, 'm0', '{}')")
        c.execute("PRAGMA user_version = 1")
    store = SqliteJobStore.open(path, result_ttl_s=TTL)
    try:
        assert store.get("j").state == "queued"
        lease = claim(store)
        assert [p.seq for p in store.pending(lease)] == [1, 2]
        assert finish(store, lease) and store.get("j").state == "succeeded" and store.get("j").done == 3
    finally:
        store.close()
