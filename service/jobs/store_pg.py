"""The PostgreSQL job store: the same operations and guarantees as the SQLite store (service/jobs/store.py),
shared by every API process and worker that names one EL_JOBS__DATABASE_URL (the `scale` extra: psycopg 3).

What differs from SQLite: writers do not serialise, so chunks are claimed with `SELECT ... FOR UPDATE OF ch
SKIP LOCKED` (two workers never wait on, nor take, the same chunk), a chunk commit locks its job row (`FOR
UPDATE`) before deciding whether the job is finished or cancelled, and a lost Idempotency-Key race shows up
as `INSERT ... ON CONFLICT DO NOTHING` inserting nothing (the store then re-reads the winner's job). The
queued-jobs cap (EL_JOBS__MAX_QUEUED) is a count without a lock here: submissions racing on several API
processes can overshoot it by a few jobs, never lose or double one. Each
thread keeps one autocommit connection; writes run in explicit transactions; a broken connection (a restarted
server) is replaced at the next call.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from service.jobs.store import CHUNKS_SCHEMA, SCHEMA, SCHEMA_VERSION, JobStore, _Discard

logger = logging.getLogger(__name__)

_SCHEMA_LOCK = 0x454C4A4F  # pg_advisory_xact_lock key: workers starting together create the schema once


class _PgTx:
    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor:
        return self.conn.execute(sql.replace("?", "%s"), args)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)


class PostgresJobStore(JobStore):
    backend = "postgresql"
    _for_update = " FOR UPDATE"
    _skip_locked = " FOR UPDATE OF ch SKIP LOCKED"
    _order_key = "rid"
    _row_key = "ctid"

    def __init__(self, url: str, *, result_ttl_s: float, clock: Callable[[], float] = time.time,
                 connect_timeout_s: int = 10) -> None:
        super().__init__(result_ttl_s=result_ttl_s, clock=clock)
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        self._conns: list[psycopg.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> PostgresJobStore:
        """Create the schema if needed (once, under an advisory lock) and refuse a newer one."""
        store = cls(url, **kwargs)
        with store._write() as c:
            c.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            c.execute("CREATE TABLE IF NOT EXISTS el_schema (version INTEGER NOT NULL)")
            row = c.execute("SELECT max(version) FROM el_schema").fetchone()
            version = row[0] or 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"job store schema {version} is newer than this service ({SCHEMA_VERSION})")
            if version < SCHEMA_VERSION:
                ddl = SCHEMA.format(real="DOUBLE PRECISION", extra_job_columns=",\n    rid BIGSERIAL") \
                    + CHUNKS_SCHEMA.format(real="DOUBLE PRECISION")
                for statement in filter(str.strip, ddl.split(";")):
                    c.execute(statement)
                c.execute("DELETE FROM el_schema")
                c.execute("INSERT INTO el_schema (version) VALUES (?)", (SCHEMA_VERSION,))
        return store

    def _insert_items(self, c: _PgTx, rows: list[tuple[str, int, str, str]]) -> None:  # type: ignore[override]
        """COPY, not row-by-row INSERTs: a million-item job is stored in seconds, inside the same transaction."""
        with c.conn.cursor() as cur, cur.copy("COPY items (job_id, seq, item_id, request) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def describe(self) -> str:
        return "postgresql:" + re.sub(r"//[^@/]*@", "//", self.url)  # never log a password

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except psycopg.Error:
                logger.debug("closing a job store connection failed", exc_info=True)

    def _conn(self) -> psycopg.Connection:
        if self._closed:
            raise RuntimeError("job store is closed")
        c: psycopg.Connection | None = getattr(self._local, "conn", None)
        if c is None or c.closed or c.broken:
            c = psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s)
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    def _read(self) -> _PgTx:
        return _PgTx(self._conn())

    @contextmanager
    def _write(self) -> Iterator[_PgTx]:
        c = self._conn()
        try:
            with c.transaction():
                yield _PgTx(c)
        except _Discard:
            return  # the transaction rolled back; the caller returns its "not written" answer
