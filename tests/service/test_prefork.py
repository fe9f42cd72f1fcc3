"""`el serve` with EL_WORKERS=2 (service/prefork.py), over real HTTP with the real encoders: both processes answer as
the single-process server does, an entity change or a compaction made through either is seen by both, a killed
worker is started again while the other serves, SIGHUP reloads each, SIGTERM stops them all with status 0, and
workers stop once their supervisor is gone."""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kg_index.manifest import Manifest
from tests.service.conftest import Server, running_server

pytestmark = pytest.mark.slow

BODY = {"mention": "Barack Obama", "context": "Barack Obama spoke in Paris.", "top_k": 5}


def _workers(server: Server) -> list[int]:
    """The supervisor's running worker processes (not multiprocessing's resource tracker), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == server.proc.pid and stat[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _link_fresh_connection(url: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=30.0) as c:  # a new connection each time: any worker may take it
        return c.post("/v1/link", json=BODY)


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped yet counts as stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


@pytest.fixture(scope="module")
def single(settings) -> list[str]:
    with running_server(settings) as server, server.client() as c:
        r = c.post("/v1/link", json=BODY)
        assert r.status_code == 200 and "x-el-worker" not in r.headers
        return [e["id"] for e in r.json()["entities"]]


def _each_worker(url: str, send, tries: int = 80) -> dict[str, httpx.Response]:
    """One answer from each of the two workers: new connections until both have answered (any may take one)."""
    seen: dict[str, httpx.Response] = {}
    for _ in range(tries):
        with httpx.Client(base_url=url, timeout=60.0) as c:
            r = send(c)
        seen.setdefault(r.headers["x-el-worker"], r)
        if len(seen) == 2:
            break
    assert set(seen) == {"0", "1"}, f"only worker(s) {sorted(seen)} answered {tries} new connections"
    return seen


@pytest.fixture
def index_copy(small_index: Path, tmp_path: Path) -> Path:
    out = tmp_path / "index"
    shutil.copytree(small_index, out)
    return out


def test_two_workers_answer_as_one_process_and_share_entity_changes(settings, single: list[str],
                                                                      index_copy: Path) -> None:
    """Any worker takes a change; the next link, whichever worker answers it, sees it; a removal and a compaction
    likewise reach both."""
    mention, context = "Zorblax Quintavian", "Zorblax Quintavian, the Venusian painter, in his studio in 1931."
    body = {"mention": mention, "context": context, "top_k": 5}
    with running_server(settings, EL_WORKERS=2, EL_INDEX__DIR=str(index_copy), EL_UPDATES__ENABLED="true",
                        EL_UPDATES__COMPACT_AFTER=0, EL_LOG_LEVEL="INFO") as server:
        assert _wait(lambda: server.log().count("ready: index") == 2, 120.0), server.log()
        assert len(_workers(server)) == 2
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _link_fresh_connection(server.base_url), range(32)))
        assert all(r.status_code == 200 for r in answers)
        assert all([e["id"] for e in r.json()["entities"]] == single for r in answers)

        with server.client() as c:
            r = c.put("/v1/entities/live:zorblax", json={
                "name": mention, "description": "Occupation: painter. Birth: 1890. Citizenship: Venus."})
            assert r.status_code == 200, r.text
            version, writer = r.json()["index_version"], r.headers["x-el-worker"]
        for worker, r in _each_worker(server.base_url, lambda c: c.post("/v1/link", json=body)).items():
            assert r.status_code == 200 and r.json()["index_version"] == version, (worker, r.text)
            assert r.json()["entities"][0]["id"] == "live:zorblax", (worker, writer)

        with server.client() as c:
            r = c.delete("/v1/entities/live:zorblax")
            assert r.status_code == 200, r.text
            version = r.json()["index_version"]
        for worker, r in _each_worker(server.base_url, lambda c: c.post("/v1/link", json=body)).items():
            assert r.json()["index_version"] == version, worker
            assert all(e["id"] != "live:zorblax" for e in r.json()["entities"]), worker

        with server.client(timeout=120.0) as c:
            r = c.post("/v1/admin/compact", params={"wait": "true"})
            assert r.status_code == 200 and r.json()["state"] == "done", r.text
            compacted = r.json()["index_version"]
        assert "+" not in compacted and compacted == Manifest.read(index_copy).version
        for worker, r in _each_worker(server.base_url, lambda c: c.post("/v1/link", json=BODY)).items():
            assert r.json()["index_version"] == compacted, worker  # the other worker loaded the compacted folder
            assert [e["id"] for e in r.json()["entities"]] == single, worker
        assert "compacted or rebuilt by another process" in server.log()

        time.sleep(1.5)  # each worker publishes its metrics every second
        with server.client() as c:
            text = c.get("/metrics").text
        linked: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name == "el_mentions_linked_total":
                    linked[sample.labels["worker"]] = linked.get(sample.labels["worker"], 0.0) + sample.value
        assert set(linked) == {"0", "1"} and sum(linked.values()) >= 32 + 6, linked  # both workers, every link


def test_a_killed_worker_is_started_again_while_the_other_serves(settings) -> None:
    with running_server(settings, EL_WORKERS=2, EL_LOG_LEVEL="INFO") as server:
        # Ready as soon as one worker is (a loading one takes no connection): wait for both here.
        assert _wait(lambda: server.log().count("ready: index") == 2, 120.0), server.log()
        first = _workers(server)
        os.kill(first[0], signal.SIGKILL)
        # Meanwhile the other worker answers every request (the new one takes no connection before it is loaded).
        for _ in range(10):
            r = _link_fresh_connection(server.base_url)
            assert r.status_code == 200, (r.text, server.log())
        assert _wait(lambda: len(_workers(server)) == 2 and first[0] not in _workers(server), 120.0), server.log()
        assert "exited with status -9; starting it again" in server.log()
        assert _wait(lambda: server.log().count("ready: index") == 3, 120.0), server.log()  # the new one too
        server.signal(signal.SIGHUP)  # each worker reloads the index
        assert _wait(lambda: server.log().count("SIGHUP: now serving index") == 2, 120.0), server.log()
        assert _link_fresh_connection(server.base_url).status_code == 200
        workers = _workers(server)
        server.signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.log()
        assert not any(_alive(p) for p in workers)


def test_workers_stop_when_their_supervisor_is_killed(settings) -> None:
    with running_server(settings, EL_WORKERS=2) as server:
        workers = _workers(server)
        server.proc.kill()
        server.proc.wait(timeout=10)
        assert _wait(lambda: not any(_alive(p) for p in workers), 30.0)
