"""Fixtures that run the real service over real HTTP: `python -m service serve` in a subprocess.

`default_server` (session scope) is a server with the default limits over the shared small index.
`start_server(**env)` (module scope factory) starts a server with extra EL_ variables for the tests that
need other caps; every server it starts is stopped when the module ends (SIGTERM, then SIGKILL after 10 s).
`running_server(settings, **env)` is the same as a context manager, for fixtures of a narrower scope
(a class), so that a custom server is stopped as soon as its tests are done.
Server output goes to a temporary log file, printed when start-up fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.server_process import ROOT, Server, launch, wait_until  # noqa: F401 (re-exported for tests/jobs)


def start(settings, overrides: dict[str, str] | None = None, *, ready: bool = True) -> Server:
    server = launch(settings, overrides)
    wait_until(server, ready=ready)
    return server


@contextmanager
def running_server(settings, *, ready: bool = True, **env: object) -> Iterator[Server]:
    """`with running_server(settings, EL_LIMITS__MAX_BODY_BYTES=4096) as server:` for class-scoped fixtures."""
    server = start(settings, {k: str(v) for k, v in env.items()}, ready=ready)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def default_server(settings) -> Iterator[Server]:
    server = start(settings)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(default_server: Server) -> Iterator[httpx.Client]:
    with default_server.client() as c:
        yield c


StartServer = Callable[..., Server]


@pytest.fixture(scope="module")
def start_server(settings) -> Iterator[StartServer]:
    """`start_server(ready=True, **env)` starts a server with extra EL_ variables; stopped at module end."""
    started: list[Server] = []

    def _start(*, ready: bool = True, **env: object) -> Server:
        server = start(settings, {k: str(v) for k, v in env.items()}, ready=ready)
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()
