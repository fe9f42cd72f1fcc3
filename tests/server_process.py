"""The real service (`python -m service serve`) in a subprocess, for every test that talks to it over HTTP.

One harness for tests/service, tests/jobs and tests/hardening: each server gets a free port, its own job
store in a temporary work folder, a parent environment without any EL_ variable, and a log file that is
printed when start-up fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
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
    early: list[tuple[int, int | None]] = field(default_factory=list)  # (healthz, readyz) seen while starting

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

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

    def metrics(self, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
        with self.client() as c:
            return scrape(c, headers)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
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


def scrape(client: httpx.Client, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample on /metrics, keyed by (name, labels)."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def launch(settings, overrides: dict[str, object] | None = None) -> Server:
    """Start a server over the session fixtures' encoders and index, without waiting for it."""
    port = free_port()
    work_dir = Path(tempfile.mkdtemp(prefix="el-serve-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EL_")}
    env.update({
        "EL_HOST": "127.0.0.1",
        "EL_PORT": str(port),
        "EL_ENCODER__ONNX_DIR": str(settings.encoder.onnx_dir),
        "EL_INDEX__DIR": str(settings.index.dir),
        "EL_DATA_DIR": str(settings.data_dir),
        "EL_JOBS__DIR": str(work_dir / "jobs"),  # never the repository's artifacts/
        "EL_LOG_LEVEL": "WARNING",
        "EL_SHUTDOWN__DRAIN_DELAY_S": "0",  # no readiness drain delay unless a test asks for one
        # The session's index folders are shared by every server: no entity changes (a change log) in them unless a
        # test asks, over a copy of its own (tests/service/test_live_updates.py).
        "EL_UPDATES__ENABLED": "false",
        # One process, whatever the machine (EL_WORKERS=auto would start one per CPU): the tests check one server
        # process's behaviour; tests/service/test_prefork.py starts several on purpose.
        "EL_WORKERS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in (overrides or {}).items()})
    fd, log_name = tempfile.mkstemp(prefix="el-serve-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Server(f"http://127.0.0.1:{port}", proc, Path(log_name), work_dir, env)


def wait_until(server: Server, *, ready: bool = True, timeout_s: float = STARTUP_TIMEOUT_S) -> Server:
    """Wait for /readyz 200 (ready=True) or for /readyz to leave "loading" (ready=False); records what
    /healthz and /readyz answered meanwhile in `server.early`."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(base_url=server.base_url, timeout=2.0) as c:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                last = f"process exited with {server.proc.returncode}"
                break
            try:
                live = c.get("/healthz").status_code
                r = c.get("/readyz")
                server.early.append((live, r.status_code))
                last = f"/readyz {r.status_code} {r.text}"
                if ready and r.status_code == 200:
                    return server
                if ready and r.status_code == 503 and r.json().get("status") == "failed":
                    break  # start-up failed for good: no point in waiting
                if not ready and r.status_code == 503 and r.json().get("status") != "loading":
                    return server
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
    log = server.log()
    server.stop()
    print(f"---- server output ({server.base_url}) ----\n{log}", file=sys.stderr)
    pytest.fail(f"server at {server.base_url} did not become {'ready' if ready else 'settled'} "
                f"(waited up to {timeout_s:.0f} s): {last}\n---- server output ----\n{log[-4000:]}")
