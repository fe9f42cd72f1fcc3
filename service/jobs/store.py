"""The job store: one SQLite file (WAL) holding jobs, their items and their results.

Why SQLite in WAL mode: the API threads read while the worker writes; a crashed process leaves a
consistent file (every change is a transaction); nothing to operate. Writers take `BEGIN IMMEDIATE`, so
two concurrent submissions with one Idempotency-Key serialise and create one job.

Why `synchronous=FULL` by default: commits are coarse (one per submission, one per chunk of
`chunk_size` items, a few heartbeats), so the fsync per commit costs well under 1 % of a chunk's compute,
and in exchange a 202 survives a power loss, not only a process crash (NORMAL in WAL mode can lose the
last commits on power loss, never consistency). Set EL_JOBS__SYNCHRONOUS=NORMAL to trade that away.

Results are keyed by (job_id, seq) and written with INSERT OR IGNORE: a chunk that runs twice (a crash
between compute and commit, a lost lease) never duplicates output, and the first outcome wins.
Timestamps are Unix seconds (REAL); the clock is injectable for tests.
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

from service.errors import IdempotencyConflict, JobQueueFull

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
SCHEMA_VERSION = 1
_DELETE_BATCH = 5000  # rows per transaction when sweeping, so a huge job never holds the write lock for long

_SCHEMA = """
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
    lease_expires_at REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,
    error TEXT
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


@dataclass(frozen=True)
class JobRecord:
    id: str
    state: str
    fingerprint: str
    idempotency_key: str | None
    total: int
    done: int
    failed: int
    attempts: int
    lease_owner: str | None
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


class JobStore:
    """Thread-safe: each thread gets its own connection (SQLite connections must not be shared mid-transaction)."""

    def __init__(self, path: Path, *, result_ttl_s: float, synchronous: str = "FULL",
                 clock: Callable[[], float] = time.time, busy_timeout_s: float = 30.0) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.result_ttl_s = result_ttl_s
        self.synchronous = synchronous
        self.clock = clock
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, path: Path, **kwargs: object) -> JobStore:
        """Create the folder and schema if needed and check the schema version."""
        store = cls(path, **kwargs)  # type: ignore[arg-type]
        store.path.parent.mkdir(parents=True, exist_ok=True)
        c = store._conn()
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            store.close()
            raise RuntimeError(f"{store.path}: job store schema {version} is newer than this service ({SCHEMA_VERSION})")
        if version == 0:
            # auto_vacuum only takes effect before the first table exists; incremental keeps the file bounded.
            c.execute("PRAGMA auto_vacuum=INCREMENTAL")
            c.executescript(_SCHEMA)
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return store

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
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(f"PRAGMA synchronous={self.synchronous}")
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front so read-then-write steps are atomic."""
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    # ---- submission and queries (API side) ----

    def create_job(self, items: Sequence[tuple[str, str]], *, fingerprint: str, idempotency_key: str | None,
                   max_queued: int, retry_after_s: int = 30) -> tuple[JobRecord, bool]:
        """Persist a queued job with its items; returns (job, created). With a known key and the same
        fingerprint the existing job comes back (created=False); a different fingerprint is a conflict."""
        now = self.clock()
        with self._write() as c:
            if idempotency_key is not None:
                row = c.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    existing = _record(row)
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
            c.execute("INSERT INTO jobs (id, state, fingerprint, idempotency_key, total, created_at) "
                      "VALUES (?, 'queued', ?, ?, ?, ?)", (job_id, fingerprint, idempotency_key, len(items), now))
            c.executemany("INSERT INTO items (job_id, seq, item_id, request) VALUES (?, ?, ?, ?)",
                          ((job_id, seq, item_id, req) for seq, (item_id, req) in enumerate(items)))
            return _get(c, job_id), True  # type: ignore[return-value]

    def get(self, job_id: str) -> JobRecord | None:
        return _get(self._conn(), job_id)

    def is_expired(self, job: JobRecord, now: float | None = None) -> bool:
        return job.expires_at is not None and job.expires_at <= (self.clock() if now is None else now)

    def recent(self, limit: int = 20, state: str | None = None) -> list[JobRecord]:
        """Newest first."""
        if state is None:
            rows = self._conn().execute("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,))
        else:
            rows = self._conn().execute("SELECT * FROM jobs WHERE state = ? ORDER BY created_at DESC, rowid DESC "
                                        "LIMIT ?", (state, limit))
        return [_record(r) for r in rows.fetchall()]

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, zeros included)."""
        out = dict.fromkeys(STATES, 0)
        for state, n in self._conn().execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall():
            out[state] = n
        return out

    def cancel(self, job_id: str) -> JobRecord | None:
        """Queued or running -> cancelled (the worker notices at its next commit); finished jobs stay as they are."""
        now = self.clock()
        with self._write() as c:
            c.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, expires_at = ?, lease_owner = NULL, "
                      "lease_expires_at = NULL WHERE id = ? AND state IN ('queued', 'running')",
                      (now, now + self.result_ttl_s, job_id))
            return _get(c, job_id)

    def delete(self, job_id: str) -> bool:
        """Delete a job with its items and results; False when there is no such job. A queued or running job
        is cancelled and marked expired in the first transaction, so its worker's next commit finds it no
        longer running and writes nothing; the rows then go in batches (a crash midway leaves an expired job
        that the next sweep finishes deleting)."""
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
        c = self._conn()
        while True:
            rows = c.execute("SELECT i.seq, i.item_id, r.result, r.error FROM items i LEFT JOIN results r "
                             "ON r.job_id = i.job_id AND r.seq = i.seq WHERE i.job_id = ? AND i.seq >= ? "
                             "ORDER BY i.seq LIMIT ?", (job_id, seq, page)).fetchall()
            if not rows:
                return
            for r in rows:
                yield r[0], r[1], r[2], r[3]
            seq = rows[-1][0] + 1

    # ---- worker side ----

    def recover(self, owner_is_dead: Callable[[str], bool]) -> int:
        """Start-up: running jobs whose lease expired or whose owner process is gone go back to the queue."""
        now = self.clock()
        with self._write() as c:
            stale = [r["id"] for r in c.execute("SELECT id, lease_owner, lease_expires_at FROM jobs "
                                                "WHERE state = 'running'").fetchall()
                     if r["lease_expires_at"] is None or r["lease_expires_at"] < now
                     or r["lease_owner"] is None or owner_is_dead(r["lease_owner"])]
            c.executemany("UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
                          "error = 'worker stopped without finishing (crash or lost lease); re-queued' WHERE id = ?",
                          [(i,) for i in stale])
        if stale:
            logger.warning("re-queued %d job(s) left running by a dead worker: %s", len(stale), ", ".join(stale))
        return len(stale)

    def requeue_expired(self) -> int:
        """Running jobs whose lease ran out (a worker that died or stalled elsewhere) go back to the queue."""
        with self._write() as c:
            n = c.execute("UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
                          "error = 'worker lease expired; re-queued' WHERE state = 'running' AND lease_expires_at < ?",
                          (self.clock(),)).rowcount
        if n:
            logger.warning("re-queued %d job(s) with an expired lease", n)
        return n

    def claim(self, owner: str, *, lease_s: float, max_attempts: int) -> JobRecord | None:
        """Take the oldest queued job: running, attempts + 1, leased to owner. Jobs that already used
        max_attempts are marked failed instead (a job that keeps killing its worker must not loop forever)."""
        now = self.clock()
        with self._write() as c:
            while True:
                row = c.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid LIMIT 1").fetchone()
                if row is None:
                    return None
                job = _record(row)
                if job.attempts >= max_attempts:
                    error = f"gave up after {job.attempts} attempt(s)" + (f"; last: {job.error}" if job.error else "")
                    c.execute("UPDATE jobs SET state = 'failed', finished_at = ?, expires_at = ?, error = ? WHERE id = ?",
                              (now, now + self.result_ttl_s, error, job.id))
                    logger.error("job %s failed: %s", job.id, error)
                    continue
                c.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, "
                          "lease_expires_at = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
                          (owner, now + lease_s, now, job.id))
                return _get(c, job.id)

    def heartbeat(self, job_id: str, owner: str, *, lease_s: float) -> bool:
        """Extend the lease; False when the job is no longer ours (cancelled, or re-queued after a stall)."""
        with self._write() as c:
            return c.execute("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND lease_owner = ? AND state = 'running'",
                             (self.clock() + lease_s, job_id, owner)).rowcount == 1

    def is_ours(self, job_id: str, owner: str) -> bool:
        row = self._conn().execute("SELECT state, lease_owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and row["state"] == "running" and row["lease_owner"] == owner

    def pending(self, job_id: str, *, from_seq: int, limit: int) -> list[PendingItem]:
        """The next items (seq >= from_seq) that have no outcome yet, in input order."""
        rows = self._conn().execute(
            "SELECT i.seq, i.item_id, i.request FROM items i WHERE i.job_id = ? AND i.seq >= ? AND NOT EXISTS "
            "(SELECT 1 FROM results r WHERE r.job_id = i.job_id AND r.seq = i.seq) ORDER BY i.seq LIMIT ?",
            (job_id, from_seq, limit)).fetchall()
        return [PendingItem(r[0], r[1], r[2]) for r in rows]

    def commit_chunk(self, job_id: str, owner: str, outcomes: Sequence[ItemOutcome], *, lease_s: float) -> bool:
        """Write a chunk's outcomes and progress in one transaction, only while the job is still ours and
        running: after a cancel (or a lost lease) nothing more is written. Returns whether it was written."""
        with self._write() as c:
            row = c.execute("SELECT state, lease_owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != "running" or row["lease_owner"] != owner:
                return False
            n_ok = c.executemany("INSERT OR IGNORE INTO results (job_id, seq, item_id, result) VALUES (?, ?, ?, ?)",
                                 [(job_id, o.seq, o.item_id, o.result) for o in outcomes if o.error is None]).rowcount
            n_err = c.executemany("INSERT OR IGNORE INTO results (job_id, seq, item_id, error) VALUES (?, ?, ?, ?)",
                                  [(job_id, o.seq, o.item_id, o.error) for o in outcomes if o.error is not None]).rowcount
            # rowcount counts only rows really inserted, so progress stays exact when a chunk is re-run.
            c.execute("UPDATE jobs SET done = done + ?, failed = failed + ?, lease_expires_at = ? WHERE id = ?",
                      (max(n_ok, 0) + max(n_err, 0), max(n_err, 0), self.clock() + lease_s, job_id))
            return True

    def finish(self, job_id: str, owner: str) -> bool:
        now = self.clock()
        with self._write() as c:
            return c.execute("UPDATE jobs SET state = 'succeeded', finished_at = ?, expires_at = ?, lease_owner = NULL, "
                             "lease_expires_at = NULL, error = NULL WHERE id = ? AND lease_owner = ? AND state = 'running'",
                             (now, now + self.result_ttl_s, job_id, owner)).rowcount == 1

    def release(self, job_id: str, owner: str, *, error: str | None = None, refund: bool = False) -> bool:
        """Hand a running job back to the queue. refund=True (clean shutdown) does not count the attempt;
        a failed attempt keeps it, so repeated failures reach max_attempts."""
        with self._write() as c:
            return c.execute("UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
                             "attempts = attempts - ?, error = COALESCE(?, error) "
                             "WHERE id = ? AND lease_owner = ? AND state = 'running'",
                             (1 if refund else 0, error, job_id, owner)).rowcount == 1

    def sweep(self) -> int:
        """Delete jobs past expires_at with their items and results; returns how many jobs went."""
        now = self.clock()
        ids = [r[0] for r in self._conn().execute("SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?",
                                                   (now,)).fetchall()]
        for job_id in ids:
            self._purge(job_id, now, vacuum=False)
        if ids:
            self._conn().execute("PRAGMA incremental_vacuum").fetchall()  # runs to completion only when stepped
            logger.info("swept %d expired job(s)", len(ids))
        return len(ids)

    def _purge(self, job_id: str, now: float, *, vacuum: bool = True) -> None:
        """Delete an expired job's results and items in batches, then the job row itself (last, so an
        interrupted purge is found again by the sweep)."""
        for table in ("results", "items"):
            while True:
                with self._write() as c:
                    n = c.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
                                  "WHERE job_id = ? LIMIT ?)", (job_id, _DELETE_BATCH)).rowcount
                if n < _DELETE_BATCH:
                    break
        with self._write() as c:
            c.execute("DELETE FROM jobs WHERE id = ? AND expires_at IS NOT NULL AND expires_at <= ?", (job_id, now))
        if vacuum:
            self._conn().execute("PRAGMA incremental_vacuum").fetchall()


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(**dict(zip(row.keys(), row, strict=True)))  # sqlite3.Row iterates values


def _get(c: sqlite3.Connection, job_id: str) -> JobRecord | None:
    row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else _record(row)


def _delete_job(c: sqlite3.Connection, job_id: str) -> None:
    for table in ("results", "items"):
        c.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
    c.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
