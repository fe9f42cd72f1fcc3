"""The job store under test, on either backend: where a server finds it (its EL_ settings) and a way to read
its rows directly (the tests check what really got stored, not only what the API says)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.jobs.store import STORE_FILE

BACKENDS = ("sqlite", "postgresql")


@dataclass
class JobDB:
    backend: str
    dir: Path
    url: str | None = None  # the PostgreSQL database; None for SQLite (the file in dir)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = {"EL_JOBS__DIR": str(self.dir)}
        if self.url:
            self.env["EL_JOBS__DATABASE_URL"] = self.url

    def rows(self, sql: str, *args: Any) -> list[tuple]:
        """Run one query (`?` placeholders) on the store and return its rows as tuples."""
        if self.url is None:
            with sqlite3.connect(self.dir / STORE_FILE, timeout=30) as c:
                return c.execute(sql, args).fetchall()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as c:
            return [tuple(r) for r in c.execute(sql.replace("?", "%s"), args).fetchall()]


def new_db(backend: str, tmp: Path, postgres: Any | None) -> JobDB:
    """A fresh, empty store: a new folder (SQLite) or a new database on the session's server (PostgreSQL)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if backend == "sqlite":
        return JobDB("sqlite", tmp)
    return JobDB("postgresql", tmp, postgres.create_database("jobs"))
