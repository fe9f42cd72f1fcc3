"""Helpers of the hardening tests over the shared server harness (tests/server_process.py): servers with
a short shutdown drain and INFO logs, several at once, and the process's memory and index files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.server_process import ROOT, Server, metric, scrape, wait_until  # noqa: F401 (re-exported)
from tests.server_process import launch as _launch

# These tests watch the shutdown sequence and the server log, so they run with a short drain delay and logs.
HARDENING_ENV = {"EL_LOG_LEVEL": "INFO", "EL_SHUTDOWN__DRAIN_DELAY_S": "0.5", "EL_SHUTDOWN__GRACE_S": "10"}


def launch(settings, **overrides: object) -> Server:
    """Start a server process without waiting for it."""
    return _launch(settings, {**HARDENING_ENV, **overrides})


def wait(server: Server, *, ready: bool = True, timeout_s: float = 120.0) -> Server:
    return wait_until(server, ready=ready, timeout_s=timeout_s)


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
