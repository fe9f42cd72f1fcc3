"""Fixtures that run the real service over real HTTP: `python -m service serve` in a subprocess.

`default_server` (session scope) is a server with the default limits over the shared small index.
`start_server(**env)` (module scope factory) starts a server with extra EL_ variables for the tests that
need other caps; every server it starts is stopped when the module ends (SIGTERM, then SIGKILL after 10 s).
`running_server(settings, **env)` is the same as a context manager, for fixtures of a narrower scope
(a class), so that a custom server is stopped as soon as its tests are done.
Server output goes to a temporary log file, printed when start-up fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One running `python -m service serve` process."""

    base_url: str
    proc: subprocess.Popen
    log_path: Path
    work_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: object) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.base_url, **kwargs)

    def async_client(self, **kwargs: object) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 30.0)
        return httpx.AsyncClient(base_url=self.base_url, **kwargs)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        try:
            self.log_path.unlink()
        except OSError:
            pass
        shutil.rmtree(self.work_dir, ignore_errors=True)


def base_env(settings) -> dict[str, str]:
    """The parent's environment without any EL_ variable, plus the paths of the session fixtures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EL_")}
    env.update({
        "EL_HOST": "127.0.0.1",
        "EL_ENCODER__ONNX_DIR": str(settings.encoder.onnx_dir),
        "EL_INDEX__DIR": str(settings.index.dir),
        "EL_DATA_DIR": str(settings.data_dir),
        "EL_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def launch(settings, overrides: dict[str, str] | None = None) -> Server:
    """Start a server process without waiting for it."""
    port = free_port()
    env = base_env(settings)
    env["EL_PORT"] = str(port)
    # Each server gets its own job store, and no readiness drain delay (shutdown is not under test here).
    work_dir = Path(tempfile.mkdtemp(prefix="el-serve-"))
    env["EL_JOBS__DIR"] = str(work_dir / "jobs")
    env["EL_SHUTDOWN__DRAIN_DELAY_S"] = "0"
    env.update({k: str(v) for k, v in (overrides or {}).items()})
    fd, log_name = tempfile.mkstemp(prefix="el-serve-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Server(f"http://127.0.0.1:{port}", proc, Path(log_name), work_dir, env)


def wait_until(server: Server, *, ready: bool = True, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Wait for /readyz 200 (ready=True) or for /healthz 200 and a /readyz that left "loading" (ready=False)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(base_url=server.base_url, timeout=2.0) as c:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                last = f"process exited with {server.proc.returncode}"
                break
            try:
                r = c.get("/readyz")
                last = f"/readyz {r.status_code} {r.text}"
                if ready and r.status_code == 200:
                    return
                if ready and r.status_code == 503 and r.json().get("status") == "failed":
                    break  # start-up failed for good: no point in waiting
                if not ready and r.status_code == 503 and r.json().get("status") != "loading":
                    return
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
    log = server.log()
    server.stop()
    print(f"---- server output ({server.base_url}) ----\n{log}", file=sys.stderr)
    pytest.fail(f"server at {server.base_url} did not become {'ready' if ready else 'settled'} "
                f"(waited up to {timeout_s:.0f} s): {last}\n---- server output ----\n{log[-4000:]}")


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
