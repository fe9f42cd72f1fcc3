"""`el serve` with EL_WORKERS=2 (service/prefork.py), over real HTTP with the real encoders: both processes answer as
the single-process server does, an entity change or a compaction made through either is seen by both, a killed
worker is started again while the other serves, SIGHUP reloads each, SIGTERM stops them all with status 0, and
workers stop once their supervisor is gone."""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
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
        # Read back first (no link in between): GET /v1/entities takes in the other worker's change by itself.
        for worker, r in _each_worker(server.base_url, lambda c: c.get("/v1/entities/live:zorblax")).items():
            assert r.status_code == 200 and r.json()["name"] == mention, (worker, r.text)
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


def _after(version: str, acked: str) -> bool:
    """`version` includes every change acknowledged as `acked`: the same folder and as many changes or more, or a
    folder compacted later (its version starts with its UTC build time, and it carries every change before it)."""
    base, _, n = version.partition("+")
    acked_base, _, acked_n = acked.partition("+")
    return base > acked_base if base != acked_base else int(n or 0) >= int(acked_n or 0)


def test_two_writers_through_two_workers_under_links_and_a_compaction(settings, index_copy: Path) -> None:
    """Two clients change disjoint entities in batches through new connections (either worker), three threads
    link meanwhile, and a compaction runs half-way. No error; after each acknowledged batch the writer's next link,
    whichever worker answers it, is at that version or later and finds the renamed entity under its new name; at
    the end both workers hold every entity as its writer last set it."""
    errors: list[str] = []
    final: dict[str, str | None] = {}
    bases: set[str] = set()  # the folders the acknowledged batches went into
    done = threading.Event()

    def writer(tag: str, url: str) -> None:
        rng = random.Random(tag)
        ids = [f"{tag}:{k}" for k in range(8)]
        state: dict[str, str | None] = dict.fromkeys(ids)
        for call in range(40):
            items = []
            for j in range(4):
                h = rng.choice(ids)
                if state[h] is not None and rng.random() < 0.25:
                    items.append({"id": h, "op": "delete"})
                    state[h] = None
                else:
                    state[h] = f"Quorbel {tag} {ids.index(h)} Rev{call}x{j}"
                    items.append({"id": h, "name": state[h], "description": f"revision {call} {j}"})
            with httpx.Client(base_url=url, timeout=120.0) as c:
                r = c.post("/v1/entities:batch", json=items)
            if r.status_code != 200:
                errors.append(f"{tag} batch {call}: {r.status_code} {r.text[:200]}")
                continue
            acked = r.json()["index_version"]
            bases.add(acked.partition("+")[0])
            renamed = next((i for i in reversed(items) if i.get("op") != "delete" and state[i["id"]] == i["name"]), None)
            if renamed is None:
                continue
            with httpx.Client(base_url=url, timeout=120.0) as c:
                a = c.post("/v1/link", json={"mention": renamed["name"], "top_k": 5})
            if a.status_code != 200:
                errors.append(f"{tag} link: {a.status_code} {a.text[:200]}")
            elif not _after(a.json()["index_version"], acked):
                errors.append(f"{tag}: answered from {a.json()['index_version']} after {acked} was acknowledged")
            elif not any(e["id"] == renamed["id"] and e["name"] == renamed["name"] for e in a.json()["entities"]):
                errors.append(f"{tag}: {renamed['id']} not found as {renamed['name']!r} in {a.json()['index_version']}")
        final.update(state)

    def linker(seed: int, url: str) -> None:
        rng = random.Random(seed)
        while not done.is_set():
            with httpx.Client(base_url=url, timeout=120.0) as c:
                r = c.post("/v1/link", json={"mention": f"Quorbel w{rng.randrange(2)} {rng.randrange(8)}",
                                             "top_k": 5})
            if r.status_code != 200:
                errors.append(f"link: {r.status_code} {r.text[:200]}")

    with running_server(settings, EL_WORKERS=2, EL_INDEX__DIR=str(index_copy), EL_UPDATES__ENABLED="true",
                        EL_UPDATES__COMPACT_AFTER=0, EL_LOG_LEVEL="INFO") as server:
        assert _wait(lambda: server.log().count("ready: index") == 2, 120.0), server.log()
        url = server.base_url
        readers = [threading.Thread(target=linker, args=(i, url)) for i in range(3)]
        writers = [threading.Thread(target=writer, args=(tag, url)) for tag in ("w0", "w1")]
        for t in readers + writers:
            t.start()
        time.sleep(2.0)
        with server.client(timeout=120.0) as c:
            compacted = c.post("/v1/admin/compact", params={"wait": "true"})
        for t in writers:
            t.join(300)
        done.set()
        for t in readers:
            t.join(60)
        assert compacted.status_code == 200, compacted.text
        assert not errors, errors[:5]
        assert len(final) == 16 and len(bases) == 2, bases  # changes went in before and after the compaction
        assert "compacted or rebuilt by another process" in server.log()  # the other worker followed the swap

        def every_entity(c: httpx.Client) -> httpx.Response:
            for h, name in final.items():  # one connection: one worker answers them all
                r = c.get(f"/v1/entities/{h}")
                assert (r.status_code, r.json().get("name")) == ((200, name) if name else (404, None)), \
                    (h, name, r.headers.get("x-el-worker"), r.text)
            return r

        _each_worker(url, every_entity)


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
        with server.client(timeout=120.0) as c:  # the admin route reloads the worker it reaches, then the other
            r = c.post("/v1/admin/reload")
            assert r.status_code == 200, r.text
            assert _wait(lambda: "SIGHUP to the others" in server.log(), 5.0), server.log()
            assert _wait(lambda: server.log().count("SIGHUP: now serving index") == 3, 120.0), server.log()
            r = c.post("/v1/admin/reload", json={"index_dir": "/tmp/another-index"})  # one worker alone: refused
            assert r.status_code == 409 and "EL_WORKERS" in r.json()["error"]["message"], r.text
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


def test_auto_runs_one_process_per_usable_cpu(settings) -> None:
    """EL_WORKERS=auto (the setting's default; the other tests pin 1): as many worker processes as `worker_count`
    says for this machine, each ready and answering; one CPU means the single-process server, no supervisor."""
    from service.offline.bench_http import workers_ready
    from service.prefork import worker_count
    from service.settings import Settings

    want = worker_count(Settings(workers="auto", encoder={"device": settings.encoder.device}))
    with running_server(settings, EL_WORKERS="auto", EL_LOG_LEVEL="INFO") as server:
        assert _wait(lambda: server.log().count("ready: index") == want, 120.0), server.log()
        assert f"EL_WORKERS=auto: {want} server process" in server.log()
        assert len(_workers(server)) == (want if want > 1 else 0), server.log()
        assert _link_fresh_connection(server.base_url).status_code == 200
        # What the benches wait for before measuring: every process's el_ready, through /metrics.
        assert _wait(lambda: workers_ready(server.base_url) == want, 10.0), server.log()


def test_keep_alive_connections_spread_over_the_workers(settings) -> None:
    """A client's few keep-alive connections, opened together, reach every worker (service/accept_balance.py): on
    the one shared socket alone, two landed in one process about a third of the time."""
    with running_server(settings, EL_WORKERS=2, EL_LOG_LEVEL="INFO") as server:
        assert _wait(lambda: server.log().count("ready: index") == 2, 120.0), server.log()
        for n in (2, 4, 2, 4, 2, 2):
            clients = [httpx.Client(base_url=server.base_url, timeout=60.0) for _ in range(n)]
            try:
                with ThreadPoolExecutor(n) as pool:  # opened together, each with a light request
                    first = list(pool.map(lambda c: c.get("/healthz"), clients))
                workers = [r.headers["x-el-worker"] for r in first]
                assert sorted(workers) == sorted(["0", "1"] * (n // 2)), workers
                again = [c.post("/v1/link", json=BODY).headers["x-el-worker"] for c in clients]
                assert again == workers  # each connection stays with its worker, links too
            finally:
                for c in clients:
                    c.close()
            time.sleep(0.5)  # the workers count a closed connection out when they see it closed
