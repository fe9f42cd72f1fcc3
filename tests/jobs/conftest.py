"""Fixtures for the job tests: real servers (`python -m service serve` subprocesses, started with the API
tests' helpers) over a real job store, and job items built from real WikiMEL test mentions. Every test that
touches a store runs twice, once per backend: a SQLite file in a temporary folder and a fresh database on a
real PostgreSQL server started for the session (tests/postgres.py). EL_STAGE_DELAY_MS and a small
EL_JOBS__CHUNK_SIZE make jobs slow enough to interrupt."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.jobs.db import BACKENDS, JobDB, new_db
from tests.jobs.helpers import SLOW, start_server
from tests.service.conftest import Server


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def make_db(backend: str, request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Callable[..., JobDB]:
    """`make_db(name)`: a fresh, empty job store on this run's backend."""
    pg = request.getfixturevalue("postgres") if backend == "postgresql" else None
    return lambda name="jobs": new_db(backend, tmp_path_factory.mktemp(name), pg)


@pytest.fixture
def servers(settings) -> Iterator[Callable[..., Server]]:
    """`servers(db, **env)` starts a server on that job store; all are stopped when the test ends."""
    started: list[Server] = []

    def _start(db: JobDB, **env: object) -> Server:
        server = start_server(settings, db, **env)
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def jobs_db(make_db: Callable[..., JobDB]) -> JobDB:
    return make_db("jobs-shared")


@pytest.fixture(scope="session")
def jobs_server(settings, jobs_db: JobDB) -> Iterator[Server]:
    """One slow-ish server shared by the API and CLI tests; its job body cap is small so 413 is cheap to hit."""
    server = start_server(settings, jobs_db, EL_JOBS__MAX_BODY_BYTES=2 * 1024 * 1024, **SLOW)
    yield server
    server.stop()


@pytest.fixture
def api(jobs_server: Server) -> Iterator[httpx.Client]:
    with jobs_server.client() as c:
        yield c


@pytest.fixture(scope="session")
def job_items(test_mentions, mel_dir: Path) -> list[dict[str, Any]]:
    """60 real WikiMEL test mentions as job items (id, mention, context, top_k). Two carry a real WikiMEL image
    as base64: their own when they have one (few test mentions do), else one of the release's image files."""
    out: list[dict[str, Any]] = [{"id": m.id, "mention": m.mention, "context": m.context, "top_k": 3}
                                 for m in test_mentions]
    own = [(i, Path(m.image)) for i, m in enumerate(test_mentions) if m.image is not None]
    spare = iter(sorted((mel_dir / "WikiMEL" / "images").glob("*.jpg")))
    picks = own[:2] + [(i, next(spare)) for i in range(2 - len(own[:2]))]
    for i, path in picks:
        out[i]["image"] = base64.b64encode(path.read_bytes()).decode()
    return out
