"""The bounded load test (reliability A4), short version: 3 s to measure capacity, 5 s at twice that.

The full run (60 s, `python scripts/loadtest.py`) is reported in the README. Here, on a 2-core machine shared
with the test process (and, on CI, with whatever else runs there), the capacity probe itself is noisy and the
background load can change within the run (capacity 49 req/s before the overload, 27 after, under a
load average of 11). So the served fraction is taken against the lower of the two capacities measured on
either side of the overload, with a bound looser than the 0.9 goal: a server that collapses under
overload still serves far less than both. The error kinds and the recovery are held to the goal.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.hardening.server import ROOT, Server, running

pytestmark = [pytest.mark.slow, pytest.mark.onnx]


@pytest.fixture(scope="module")
def server(settings) -> Server:
    with running(settings, EL_LOG_LEVEL="WARNING") as s:
        yield s


def loadtest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "loadtest.py"), *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_refuses_any_target_but_loopback() -> None:
    for url in ("http://10.0.0.1:8000", "http://localhost:8000", "https://127.0.0.1:8000", "http://example.com"):
        proc = loadtest("--url", url, "--hold-s", "1")
        assert proc.returncode != 0 and "refusing to load-test" in proc.stderr, (url, proc.stderr)


def test_short_overload_serves_capacity_and_recovers(server: Server) -> None:
    proc = loadtest("--url", server.base_url, "--probe-s", "3", "--hold-s", "5", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["capacity_rps"] > 0
    assert report["sent"] >= 0.9 * 2 * report["capacity_rps"] * report["hold_s"], report  # it really offered 2x
    assert set(report["errors"]) <= {"429", "503"}, report
    assert report["served_fraction_bracketed"] >= 0.75, report
    assert report["recovery_s"] is not None and report["recovery_s"] <= 5.0, report
    assert report["total_requests"] <= 200_000
