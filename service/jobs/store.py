"""The job store: jobs, their items, their chunks (the unit a worker leases) and their results.

One interface, two backends sharing the SQL below: SQLite (this module; the embedded default, one file, nothing
to operate) and PostgreSQL (service/jobs/store_pg.py; several API processes and workers on several machines
share one queue). `open_store` picks one from EL_JOBS__DATABASE_URL.

The guarantees, on both backends:
- a job and all its items (and its chunks) are stored in one transaction before the 202;
- an Idempotency-Key is a unique column: concurrent submissions with one key make one job (SQLite serialises
  writers with BEGIN IMMEDIATE; PostgreSQL's INSERT ... ON CONFLICT DO NOTHING makes the loser re-read);
- work is leased per chunk (owner, expiry, heartbeat): several workers share one job's chunks; a chunk whose
  lease ran out (a dead or stalled worker) is claimed again by anyone (PostgreSQL: FOR UPDATE SKIP LOCKED);
- a chunk's results and its completion commit together, accepted only from the chunk lease's owner while the
  job still runs; results are keyed by (job, seq) and inserted with ON CONFLICT DO NOTHING, so a chunk run
  twice never doubles output and the first outcome wins; the commit of the last chunk finishes the job;
- finished jobs expire after the TTL and are swept; cancel stops every further commit.

Lock order (PostgreSQL row locks): a transaction that touches a chunk locks the chunk before its job and never
the other way round, so claims, commits and cancels cannot deadlock.

Why SQLite in WAL mode with `synchronous=FULL` by default: the API threads read while the worker writes; commits
are coarse (one per submission, one per chunk), so the fsync costs well under 1 % of a chunk's compute, and a
202 survives a power loss, not only a process crash. EL_JOBS__SYNCHRONOUS=NORMAL trades that away.

Timestamps are Unix seconds (REAL / double precision); the clock is injectable for tests.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from service.errors import IdempotencyConflict, JobQueueFull

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
SCHEMA_VERSION = 2
STORE_FILE = "jobs.sqlite3"
DEFAULT_CHUNK_SIZE = 64
_DELETE_BATCH = 5000  # rows per transaction when sweeping, so a huge job never holds the write lock for long

JOB_COLUMNS = ("id", "state", "fingerprint", "idempotency_key", "total", "done", "failed", "attempts", "lease_owner",
               "lease_expires_at", "created_at", "started_at", "finished_at", "expires_at", "error")
_JOB_SELECT = "SELECT " + ", ".join(JOB_COLUMNS) + " FROM jobs"

# {real}: REAL in SQLite, DOUBLE PRECISION in PostgreSQL (whose REAL is 4 bytes: too coarse for timestamps).
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    fingerprint TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at {real},
    created_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    expires_at {real},
    error TEXT{extra_job_columns}
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    request TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    result TEXT,
    error TEXT,
    PRIMARY KEY (job_id, seq),
    CHECK ((result IS NULL) <> (error IS NULL))
);
"""
CHUNKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    job_id TEXT NOT NULL,
    no INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done')),
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at {real},
    done_by TEXT,
    error TEXT,
    PRIMARY KEY (job_id, no)
);
CREATE INDEX IF NOT EXISTS chunks_open ON chunks (state, job_id, no) WHERE state <> 'done';
"""


@dataclass(frozen=True)
class JobRecord:
    id: str
    state: str
    fingerprint: str
    idempotency_key: str | None
    total: int
    done: int
    failed: int
    attempts: int  # the most runs any one chunk of the job took (1 when nothing was retried)
    lease_owner: str | None  # the worker that last claimed a chunk of the job
    lease_expires_at: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    error: str | None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class ChunkLease:
    """A claimed chunk: items first_seq..last_seq of a job, leased to owner until a heartbeat or commit."""

    job_id: str
    no: int
    first_seq: int
    last_seq: int
    attempts: int
    owner: str


@dataclass(frozen=True)
class PendingItem:
    seq: int
    item_id: str
    request: str  # the item's canonical JSON


@dataclass(frozen=True)
class ItemOutcome:
    """One item's outcome: `result` (LinkResponse JSON) or `error` ({"code", "message"} JSON)."""

    seq: int
    item_id: str
    result: str | None = None
    error: str | None = None


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """What the shared SQL runs on: one connection, `?` placeholders (a backend translates its own)."""

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class _Retry(Exception):
    """Raised inside a write transaction to roll it back and run it again (a lost idempotency race)."""


class JobStore:
    """The backend-neutral part: every operation, written once over `?`-placeholder SQL. A backend supplies
    connections (`_read`, `_write`), its dialect bits and its schema set-up. Thread-safe."""

    backend = "abstract"
    _for_update = ""  # PostgreSQL: " FOR UPDATE"
    _skip_locked = ""  # PostgreSQL: " FOR UPDATE OF ch SKIP LOCKED"
    _order_key = "rowid"  # insertion order of jobs (tie-break among equal created_at)
    _row_key = "rowid"  # a physical row id, for batched deletes

    def __init__(self, *, result_ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.result_ttl_s = result_ttl_s
        self.clock = clock

    # ---- backend hooks ----

    def _read(self) -> Tx:
        raise NotImplementedError

    @contextmanager
    def _write(self) -> Iterator[Tx]:
        raise NotImplementedError
        yield  # pragma: no cover

    def close(self) -> None:
        raise NotImplementedError

    def _after_sweep(self) -> None:
        """Give freed space back (SQLite incremental vacuum); nothing by default."""

    def describe(self) -> str:
        raise NotImplementedError

    # ---- submission and queries (API side) ----

    def create_job(self, items: Sequence[tuple[str, str]], *, fingerprint: str, idempotency_key: str | None,
                   max_queued: int, retry_after_s: int = 30,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[JobRecord, bool]:
        """Persist a queued job with its items and chunks; returns (job, created). With a known key and the same
        fingerprint the existing job comes back (created=False); a different fingerprint is a conflict."""
        for _ in range(5):
            try:
                return self._create_job(items, fingerprint, idempotency_key, max_queued, retry_after_s, chunk_size)
            except _Retry:
                continue  # another submission with this key committed first: the next pass returns its job
        raise RuntimeError(f"could not settle Idempotency-Key {idempotency_key!r} after 5 tries")

    def _create_job(self, items: Sequence[tuple[str, str]], fingerprint: str, idempotency_key: str | None,
                    max_queued: int, retry_after_s: int, chunk_size: int) -> tuple[JobRecord, bool]:
        now = self.clock()
        with self._write() as c:
            if idempotency_key is not None:
                row = c.execute(_JOB_SELECT + " WHERE idempotency_key = ?" + self._for_update,
                                (idempotency_key,)).fetchone()
                if row is not None:
                    existing = JobRecord(*row)
                    if self.is_expired(existing, now):
                        _delete_job(c, existing.id)  # expired, not yet swept: the key is free again
                    elif existing.fingerprint != fingerprint:
                        raise IdempotencyConflict(
                            f"Idempotency-Key already used for job {existing.id} with a different body")
                    else:
                        return existing, False
            queued = c.execute("SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
            if queued >= max_queued:
                raise JobQueueFull(f"{queued} jobs are queued (cap {max_queued}); retry later",
                                   headers={"Retry-After": str(retry_after_s)})
            job_id = uuid.uuid4().hex
            inserted = c.execute("INSERT INTO jobs (id, state, fingerprint, idempotency_key, total, created_at) "
                                 "VALUES (?, 'queued', ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
                                 (job_id, fingerprint, idempotency_key, len(items), now)).rowcount
            if inserted != 1:
                raise _Retry
            self._insert_items(c, [(job_id, seq, item_id, req) for seq, (item_id, req) in enumerate(items)])
            n = len(items)
            c.executemany("INSERT INTO chunks (job_id, no, first_seq, last_seq, state) VALUES (?, ?, ?, ?, 'queued')",
                          [(job_id, no, first, min(first + chunk_size, n) - 1)
                           for no, first in enumerate(range(0, n, chunk_size))])
            return _get(c, job_id), True  # type: ignore[return-value]

    def _insert_items(self, c: Tx, rows: list[tuple[str, int, str, str]]) -> None:
        c.executemany("INSERT INTO items (job_id, seq, item_id, request) VALUES (?, ?, ?, ?)", rows)

    def get(self, job_id: str) -> JobRecord | None:
        return _get(self._read(), job_id)

    def is_expired(self, job: JobRecord, now: float | None = None) -> bool:
        return job.expires_at is not None and job.expires_at <= (self.clock() if now is None else now)

    def recent(self, limit: int = 20, state: str | None = None) -> list[JobRecord]:
        """Newest first."""
        order = f" ORDER BY created_at DESC, {self._order_key} DESC LIMIT ?"
        if state is None:
            rows = self._read().execute(_JOB_SELECT + order, (limit,))
        else:
            rows = self._read().execute(_JOB_SELECT + " WHERE state = ?" + order, (state, limit))
        return [JobRecord(*r) for r in rows.fetchall()]

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, zeros included)."""
        out = dict.fromkeys(STATES, 0)
        for state, n in self._read().execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall():
            out[state] = n
        return out

    def cancel(self, job_id: str) -> JobRecord | None:
        """Queued or running -> cancelled (no chunk commits after this); finished jobs stay as they are."""
        now = self.clock()
        with self._write() as c:
            c.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, expires_at = ?, lease_owner = NULL, "
                      "lease_expires_at = NULL WHERE id = ? AND state IN ('queued', 'running')",
                      (now, now + self.result_ttl_s, job_id))
            return _get(c, job_id)

    def delete(self, job_id: str) -> bool:
        """Delete a job with its items, chunks and results; False when there is no such job. A queued or running
        job is cancelled and marked expired in the first transaction, so no worker commits to it any more; the
        rows then go in batches (a crash midway leaves an expired job that the next sweep finishes deleting)."""
        now = self.clock()
        with self._write() as c:
            job = _get(c, job_id)
            if job is None:
                return False
            c.execute("UPDATE jobs SET state = CASE WHEN state IN ('queued', 'running') THEN 'cancelled' ELSE state END, "
                      "finished_at = COALESCE(finished_at, ?), expires_at = ?, lease_owner = NULL, "
                      "lease_expires_at = NULL WHERE id = ?", (now, now, job_id))
        self._purge(job_id, now)
        logger.info("job %s deleted (was %s)", job_id, job.state)
        return True

    def iter_outcomes(self, job_id: str, *, page: int = 1000) -> Iterator[tuple[int, str, str | None, str | None]]:
        """(seq, item_id, result, error) for every item in input order; result and error are None when the
        item never ran. Read in pages, each its own statement, so no read transaction spans a slow client."""
        seq = 0
        while True:
            rows = self._read().execute(
                "SELECT i.seq, i.item_id, r.result, r.error FROM items i LEFT JOIN results r "
                "ON r.job_id = i.job_id AND r.seq = i.seq WHERE i.job_id = ? AND i.seq >= ? "
                "ORDER BY i.seq LIMIT ?", (job_id, seq, page)).fetchall()
            if not rows:
                return
            for r in rows:
                yield r[0], r[1], r[2], r[3]
            seq = rows[-1][0] + 1

    # ---- worker side ----

    def recover(self, owner_is_dead: Callable[[str], bool]) -> int:
        """Start-up: running chunks whose lease expired or whose owner process is gone go back to the queue (and
        their jobs, when nothing else of them runs). Returns the number of chunks re-queued."""
        now = self.clock()
        with self._write() as c:
            stale = [(r[0], r[1]) for r in c.execute(
                "SELECT job_id, no, lease_owner, lease_expires_at FROM chunks WHERE state = 'running' "
                "ORDER BY job_id, no").fetchall()
                if r[3] is None or r[3] < now or r[2] is None or owner_is_dead(r[2])]
            for job_id, no in stale:
                c.execute("UPDATE chunks SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
                          "error = 'worker stopped without finishing (crash or lost lease); re-queued' "
                          "WHERE job_id = ? AND no = ?", (job_id, no))
            for job_id in sorted({j for j, _ in stale}):
                c.execute("UPDATE jobs SET error = 'worker stopped without finishing (crash or lost lease); re-queued' "
                          "WHERE id = ? AND state = 'running'", (job_id,))
                _park_if_idle(c, job_id, now)
        if stale:
            logger.warning("re-queued %d chunk(s) left running by a dead worker (jobs %s)", len(stale),
                           ", ".join(sorted({j for j, _ in stale})))
        return len(stale)

    def claim(self, owner: str, *, lease_s: float, max_attempts: int) -> ChunkLease | None:
        """Lease the next chunk: the first queued chunk (or running one whose lease ran out) of the oldest job
        still queued or running; its attempts + 1, the job running. A chunk that already used max_attempts
        fails its job instead (a chunk that keeps killing its worker must not loop forever)."""
        now = self.clock()
        with self._write() as c:
            while True:
                row = c.execute(
                    "SELECT ch.job_id, ch.no, ch.first_seq, ch.last_seq, ch.attempts, ch.error FROM chunks ch "
                    "JOIN jobs j ON j.id = ch.job_id WHERE j.state IN ('queued', 'running') AND "
                    "(ch.state = 'queued' OR (ch.state = 'running' AND ch.lease_expires_at < ?)) "
                    f"ORDER BY j.created_at, j.{self._order_key}, ch.no LIMIT 1" + self._skip_locked,
                    (now,)).fetchone()
                if row is None:
                    return None
                job_id, no, first, last, attempts, last_error = row
                if attempts >= max_attempts:
                    error = f"gave up after {attempts} attempt(s) of chunk {no}" + (
                        f"; last: {last_error}" if last_error else "")
                    c.execute("UPDATE chunks SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL "
                              "WHERE job_id = ? AND no = ?", (job_id, no))
                    c.execute("UPDATE jobs SET state = 'failed', finished_at = ?, expires_at = ?, error = ?, "
                              "lease_owner = NULL, lease_expires_at = NULL WHERE id = ? AND state IN ('queued', 'running')",
                              (now, now + self.result_ttl_s, error, job_id))
                    logger.error("job %s failed: %s", job_id, error)
                    continue
                c.execute("UPDATE chunks SET state = 'running', attempts = ?, lease_owner = ?, lease_expires_at = ? "
                          "WHERE job_id = ? AND no = ?", (attempts + 1, owner, now + lease_s, job_id, no))
                if c.execute("UPDATE jobs SET state = 'running', attempts = CASE WHEN attempts < ? THEN ? ELSE attempts "
                             "END, lease_owner = ?, lease_expires_at = ?, started_at = COALESCE(started_at, ?) "
                             "WHERE id = ? AND state IN ('queued', 'running')",
                             (attempts + 1, attempts + 1, owner, now + lease_s, now, job_id)).rowcount != 1:
                    # Cancelled (or deleted) since the SELECT: PostgreSQL locks only the chunk row there, so a cancel
                    # can commit in between, and setting the job running again would bring it back to life (its
                    # next chunks would commit). Nothing is leased: the next claim looks again.
                    raise _Discard
                return ChunkLease(job_id, no, first, last, attempts + 1, owner)
        return None  # _Discard: the job stopped while its chunk was being leased

    def heartbeat(self, lease: ChunkLease, *, lease_s: float) -> bool:
        """Extend the lease; False when the chunk is no longer ours (job cancelled or deleted, lease taken over)."""
        with self._write() as c:
            return c.execute("UPDATE chunks SET lease_expires_at = ? WHERE job_id = ? AND no = ? AND lease_owner = ? "
                             "AND state = 'running' AND EXISTS (SELECT 1 FROM jobs WHERE id = ? AND state = 'running')",
                             (self.clock() + lease_s, lease.job_id, lease.no, lease.owner, lease.job_id)).rowcount == 1

    def is_ours(self, lease: ChunkLease) -> bool:
        row = self._read().execute(
            "SELECT ch.state, ch.lease_owner, j.state FROM chunks ch JOIN jobs j ON j.id = ch.job_id "
            "WHERE ch.job_id = ? AND ch.no = ?", (lease.job_id, lease.no)).fetchone()
        return row is not None and row[0] == "running" and row[1] == lease.owner and row[2] == "running"

    def pending(self, lease: ChunkLease) -> list[PendingItem]:
        """The chunk's items that have no outcome yet (all of them, unless an earlier run half-committed), in order."""
        rows = self._read().execute(
            "SELECT i.seq, i.item_id, i.request FROM items i WHERE i.job_id = ? AND i.seq >= ? AND i.seq <= ? "
            "AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = i.job_id AND r.seq = i.seq) ORDER BY i.seq",
            (lease.job_id, lease.first_seq, lease.last_seq)).fetchall()
        return [PendingItem(r[0], r[1], r[2]) for r in rows]

    def commit_chunk(self, lease: ChunkLease, outcomes: Sequence[ItemOutcome]) -> bool:
        """Write a chunk's outcomes, its completion and the job's progress in one transaction, only while the
        chunk is leased to us and the job still runs (after a cancel, a delete or a lease taken over nothing is
        written). The last chunk's commit finishes the job. Returns whether it was written."""
        now = self.clock()
        with self._write() as c:
            if c.execute("UPDATE chunks SET state = 'done', done_by = lease_owner, lease_owner = NULL, "
                         "lease_expires_at = NULL, error = NULL WHERE job_id = ? AND no = ? AND state = 'running' "
                         "AND lease_owner = ?", (lease.job_id, lease.no, lease.owner)).rowcount != 1:
                return False
            row = c.execute("SELECT state FROM jobs WHERE id = ?" + self._for_update, (lease.job_id,)).fetchone()
            if row is None or row[0] != "running":
                raise _Discard
            n_ok = _insert_outcomes(c, lease.job_id, [o for o in outcomes if o.error is None], "result")
            n_err = _insert_outcomes(c, lease.job_id, [o for o in outcomes if o.error is not None], "error")
            # Only rows really inserted count, so progress stays exact when a chunk is re-run.
            c.execute("UPDATE jobs SET done = done + ?, failed = failed + ? WHERE id = ?",
                      (n_ok + n_err, n_err, lease.job_id))
            # The job row is locked now: of two last chunks committing at once, the second sees the first done.
            open_chunks = c.execute("SELECT count(*) FROM chunks WHERE job_id = ? AND state <> 'done'",
                                    (lease.job_id,)).fetchone()[0]
            if open_chunks == 0:
                c.execute("UPDATE jobs SET state = 'succeeded', finished_at = ?, expires_at = ?, lease_owner = NULL, "
                          "lease_expires_at = NULL, error = NULL WHERE id = ?", (now, now + self.result_ttl_s, lease.job_id))
                logger.info("job %s succeeded", lease.job_id)
            return True
        return False  # _Discard: the job no longer runs; the chunk's completion was rolled back

    def release(self, lease: ChunkLease, *, error: str | None = None, refund: bool = False) -> bool:
        """Hand a leased chunk back to the queue. refund=True (clean shutdown) does not count the attempt; a failed
        attempt keeps it, so repeated failures reach max_attempts. The job goes back to queued when nothing
        else of it runs."""
        now = self.clock()
        with self._write() as c:
            if c.execute("UPDATE chunks SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
                         "attempts = attempts - ?, error = COALESCE(?, error) "
                         "WHERE job_id = ? AND no = ? AND lease_owner = ? AND state = 'running'",
                         (1 if refund else 0, error, lease.job_id, lease.no, lease.owner)).rowcount != 1:
                return False
            c.execute("UPDATE jobs SET attempts = (SELECT max(attempts) FROM chunks WHERE job_id = ?), "
                      "error = COALESCE(?, error) WHERE id = ? AND state = 'running'", (lease.job_id, error, lease.job_id))
            _park_if_idle(c, lease.job_id, now)
            return True

    def park(self, job_id: str) -> bool:
        """A worker stopping between chunks: its job goes back to queued when no chunk of it is leased."""
        with self._write() as c:
            return _park_if_idle(c, job_id, self.clock())

    def sweep(self) -> int:
        """Delete jobs past expires_at with their items, chunks and results; returns how many jobs went."""
        now = self.clock()
        ids = [r[0] for r in self._read().execute(
            "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)).fetchall()]
        for job_id in ids:
            self._purge(job_id, now, vacuum=False)
        if ids:
            self._after_sweep()
            logger.info("swept %d expired job(s)", len(ids))
        return len(ids)

    def _purge(self, job_id: str, now: float, *, vacuum: bool = True) -> None:
        """Delete an expired job's results, chunks and items in batches, then the job row itself (last, so an
        interrupted purge is found again by the sweep)."""
        for table in ("results", "chunks", "items"):
            while True:
                with self._write() as c:
                    n = c.execute(f"DELETE FROM {table} WHERE {self._row_key} IN (SELECT {self._row_key} FROM {table} "
                                  "WHERE job_id = ? LIMIT ?)", (job_id, _DELETE_BATCH)).rowcount
                if n < _DELETE_BATCH:
                    break
        with self._write() as c:
            c.execute("DELETE FROM jobs WHERE id = ? AND expires_at IS NOT NULL AND expires_at <= ?", (job_id, now))
        if vacuum:
            self._after_sweep()


class _Discard(Exception):
    """Raised inside commit_chunk to roll back the chunk's completion when its job no longer runs."""


def _insert_outcomes(c: Tx, job_id: str, outcomes: Sequence[ItemOutcome], column: str) -> int:
    """One multi-row INSERT ... ON CONFLICT DO NOTHING; returns the rows really inserted."""
    if not outcomes:
        return 0
    values = ", ".join(["(?, ?, ?, ?)"] * len(outcomes))
    args: list[Any] = []
    for o in outcomes:
        args += [job_id, o.seq, o.item_id, o.result if column == "result" else o.error]
    n = c.execute(f"INSERT INTO results (job_id, seq, item_id, {column}) VALUES {values} "
                  "ON CONFLICT (job_id, seq) DO NOTHING", args).rowcount
    return max(n, 0)


def _park_if_idle(c: Tx, job_id: str, now: float) -> bool:
    """running -> queued when no chunk of the job holds a live lease."""
    return c.execute("UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL "
                     "WHERE id = ? AND state = 'running' AND NOT EXISTS (SELECT 1 FROM chunks WHERE job_id = ? "
                     "AND state = 'running' AND lease_expires_at >= ?)", (job_id, job_id, now)).rowcount == 1


def _get(c: Tx, job_id: str) -> JobRecord | None:
    row = c.execute(_JOB_SELECT + " WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else JobRecord(*row)


def _delete_job(c: Tx, job_id: str) -> None:
    for table in ("results", "chunks", "items"):
        c.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
    c.execute("DELETE FROM jobs WHERE id = ?", (job_id,))


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, args)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)


class SqliteJobStore(JobStore):
    """One SQLite file (WAL). Each thread gets its own connection (SQLite connections must not be shared
    mid-transaction); writers take BEGIN IMMEDIATE, so read-then-write steps are atomic."""

    backend = "sqlite"

    def __init__(self, path: Path, *, result_ttl_s: float, synchronous: str = "FULL",
                 clock: Callable[[], float] = time.time, busy_timeout_s: float = 30.0) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        super().__init__(result_ttl_s=result_ttl_s, clock=clock)
        self.path = Path(path)
        self.synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, path: Path, **kwargs: Any) -> SqliteJobStore:
        """Create the folder and schema if needed, migrate an older schema, refuse a newer one."""
        store = cls(path, **kwargs)
        store.path.parent.mkdir(parents=True, exist_ok=True)
        c = store._conn()
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            store.close()
            raise RuntimeError(f"{store.path}: job store schema {version} is newer than this service ({SCHEMA_VERSION})")
        if version == 0:
            # auto_vacuum only takes effect before the first table exists; incremental keeps the file bounded.
            c.execute("PRAGMA auto_vacuum=INCREMENTAL")
            c.executescript(SCHEMA.format(real="REAL", extra_job_columns="") + CHUNKS_SCHEMA.format(real="REAL"))
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version == 1:
            store._migrate_v1()
        return store

    def _migrate_v1(self) -> None:
        """Schema 1 leased whole jobs: add the chunks of every unfinished job (chunks whose items all have an
        outcome are done) and put running jobs back in the queue."""
        self._conn().executescript(CHUNKS_SCHEMA.format(real="REAL"))  # IF NOT EXISTS: safe to repeat
        with self._write() as c:
            c.execute(
                "INSERT INTO chunks (job_id, no, first_seq, last_seq, state) "
                "SELECT i.job_id, i.seq / ?, min(i.seq), max(i.seq), "
                "CASE WHEN count(r.seq) = count(*) THEN 'done' ELSE 'queued' END "
                "FROM items i JOIN jobs j ON j.id = i.job_id AND j.state IN ('queued', 'running') "
                "LEFT JOIN results r ON r.job_id = i.job_id AND r.seq = i.seq GROUP BY i.job_id, i.seq / ?",
                (DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE))
            c.execute("UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL "
                      "WHERE state = 'running'")
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        logger.info("%s: job store migrated to schema %d (chunk leases)", self.path, SCHEMA_VERSION)

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:  # a connection of a thread that is mid-statement; the process is ending anyway
                logger.debug("closing a job store connection failed", exc_info=True)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("job store is closed")
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(f"PRAGMA synchronous={self.synchronous}")
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    def _read(self) -> _SqliteTx:
        return _SqliteTx(self._conn())

    @contextmanager
    def _write(self) -> Iterator[_SqliteTx]:
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteTx(c)
        except _Discard:
            c.execute("ROLLBACK")
            return
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def _after_sweep(self) -> None:
        self._conn().execute("PRAGMA incremental_vacuum").fetchall()  # runs to completion only when stepped


def open_store(cfg: Any, *, clock: Callable[[], float] = time.time) -> JobStore:
    """The store EL_JOBS__DATABASE_URL names: `postgresql://...` (needs the `scale` extra) or, by default, the
    SQLite file in EL_JOBS__DIR (a `sqlite:///path` URL names another file)."""
    url: str | None = cfg.database_url
    if url and url.startswith(("postgresql://", "postgres://")):
        from service.jobs.store_pg import PostgresJobStore  # psycopg only when asked for

        return PostgresJobStore.open(url, result_ttl_s=cfg.result_ttl_s, clock=clock)
    path = Path(url.removeprefix("sqlite:///")) if url else Path(cfg.dir) / STORE_FILE
    return SqliteJobStore.open(path, result_ttl_s=cfg.result_ttl_s, synchronous=cfg.synchronous, clock=clock)
