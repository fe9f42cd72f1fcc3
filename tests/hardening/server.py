"""Run the real service (`python -m service serve`) in a subprocess for the hardening tests, and read it back.

Kept separate from tests/service/conftest.py on purpose: these tests send signals, read the server log,
watch its memory and start several servers at once, so they need the process handle and full control.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    early: list[tuple[int, int | None]] = field(default_factory=list)  # (healthz, readyz) seen while starting

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def client(self, **kwargs: object) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.base_url, **kwargs)

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
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        try:
            self.log_path.unlink()
        except OSError:
            pass


def scrape(client: httpx.Client, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def base_env(settings, jobs_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EL_")}
    env.update({
        "EL_HOST": "127.0.0.1",
        "EL_ENCODER__ONNX_DIR": str(settings.encoder.onnx_dir),
        "EL_INDEX__DIR": str(settings.index.dir),
        "EL_DATA_DIR": str(settings.data_dir),
        "EL_JOBS__DIR": str(jobs_dir),  # never the repository's artifacts/
        "EL_LOG_LEVEL": "INFO",
        "EL_SHUTDOWN__DRAIN_DELAY_S": "0.5",
        "EL_SHUTDOWN__GRACE_S": "10",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def launch(settings, **overrides: object) -> Server:
    """Start a server process without waiting for it."""
    port = free_port()
    env = base_env(settings, Path(tempfile.mkdtemp(prefix="el-jobs-")))
    env["EL_PORT"] = str(port)
    env.update({k: str(v) for k, v in overrides.items()})
    fd, log_name = tempfile.mkstemp(prefix="el-hardening-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Server(f"http://127.0.0.1:{port}", proc, Path(log_name), env)


def wait(server: Server, *, ready: bool = True, timeout_s: float = STARTUP_TIMEOUT_S) -> Server:
    """Wait for /readyz 200 (ready) or for a /readyz that left "loading" (not ready); records what it saw."""
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
                if not ready and r.status_code == 503 and r.json().get("status") != "loading":
                    return server
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}"
            time.sleep(0.05)
    log = server.log()
    server.stop()
    raise AssertionError(f"server {server.base_url} did not become {'ready' if ready else 'settled'}: {last}\n"
                         f"---- server output ----\n{log[-4000:]}")


@contextmanager
def running(settings, *, ready: bool = True, **overrides: object) -> Iterator[Server]:
    server = wait(launch(settings, **overrides), ready=ready)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_many(settings, configs: list[dict[str, object]]) -> Iterator[list[Server]]:
    """Start several servers at once (start-up overlaps), all ready."""
    servers = [launch(settings, **cfg) for cfg in configs]
    try:
        for s in servers:
            wait(s)
        yield servers
    finally:
        for s in servers:
            s.stop()


def peak_rss_reset(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of pid; False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


def index_ids(folder: Path) -> set[str]:
    return set(json.loads((folder / "ids.json").read_text()))


def index_version(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["version"]
