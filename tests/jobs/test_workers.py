"""`el worker` processes on a shared job store, on each backend: an API process with no worker of its own
(EL_JOBS__RUN_WORKER=false) queues a job, two worker processes share its chunks, one is SIGKILLed while it
holds a chunk; the job still completes with exactly one result per item (checked in the store's rows)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.jobs.db import JobDB
from tests.jobs.helpers import db_rows, finished, many, result_lines, submit, wait_job
from tests.service.conftest import Server

pytestmark = [pytest.mark.slow, pytest.mark.onnx]  # real workers over the real encoders

# Chunks of 1 item, 100 ms of encode delay each; a 2 s lease so the killed worker's chunk is taken over soon.
ENV = {"EL_JOBS__CHUNK_SIZE": "1", "EL_STAGE_DELAY_MS": "100", "EL_JOBS__LEASE_S": "2", "EL_JOBS__POLL_INTERVAL_S": "0.1"}


@pytest.fixture
def workers() -> Iterator[Callable[[Server], subprocess.Popen]]:
    """`workers(server)` starts `python -m service worker` with that server's settings; all stopped at the end."""
    procs: list[tuple[subprocess.Popen, Path]] = []

    def _start(server: Server) -> subprocess.Popen:
        fd, log = tempfile.mkstemp(prefix="el-worker-", suffix=".log")
        env = {k: v for k, v in server.env.items() if k != "EL_JOBS__RUN_WORKER"}
        with os.fdopen(fd, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "service", "worker"], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append((proc, Path(log)))
        return proc

    yield _start
    for proc, log in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.unlink(missing_ok=True)


def owner_of(proc: subprocess.Popen) -> str:
    return f"%:{proc.pid}:%"


def test_two_workers_share_a_job_and_a_sigkill_loses_and_doubles_nothing(
        servers: Callable[..., Server], make_db: Callable[..., JobDB], workers, job_items: list[dict]) -> None:
    db = make_db("workers")
    api = servers(db, EL_JOBS__RUN_WORKER="false", **ENV)
    items = many(job_items, 60, "w")
    with api.client() as c:
        job_id = submit(c, items, key="shared").json()["job_id"]
        time.sleep(1.0)
        assert c.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"  # the API process runs no worker
        first, second = workers(api), workers(api)
        deadline = time.monotonic() + 120
        # Both workers have committed chunks of the job (both loaded), and the first one holds a chunk right now.
        while not (db_rows(db, "SELECT count(*) FROM chunks WHERE job_id = ? AND done_by LIKE ?", job_id,
                           owner_of(first))[0][0]
                   and db_rows(db, "SELECT count(*) FROM chunks WHERE job_id = ? AND done_by LIKE ?", job_id,
                               owner_of(second))[0][0]
                   and db_rows(db, "SELECT count(*) FROM chunks WHERE job_id = ? AND state = 'running' AND "
                                   "lease_owner LIKE ?", job_id, owner_of(first))[0][0]):
            assert time.monotonic() < deadline, "the two workers never both worked on the job"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)  # mid-chunk: its lease runs out and the other worker redoes the chunk
        first.wait(10)
        job = wait_job(c, job_id, finished, timeout_s=120, what="finish after the kill")
        assert job["state"] == "succeeded" and job["progress"] == {"done": 60, "total": 60, "failed": 0}
        lines = result_lines(c, job_id)
    assert [line["id"] for line in lines] == [i["id"] for i in items] and all("result" in line for line in lines)
    assert db_rows(db, "SELECT count(*), count(DISTINCT seq), count(DISTINCT item_id) FROM results WHERE job_id = ?",
                   job_id) == [(60, 60, 60)]
    assert db_rows(db, "SELECT count(*) FROM chunks WHERE job_id = ? AND attempts > 1", job_id)[0][0] >= 1
    by = {row[0] for row in db_rows(db, "SELECT done_by FROM chunks WHERE job_id = ?", job_id)}
    pids = {int(re.match(r"[^:]*:(\d+):", owner).group(1)) for owner in by}
    assert pids == {first.pid, second.pid}  # both workers committed chunks of the one job
    assert second.poll() is None  # the survivor keeps serving the queue


def test_a_worker_links_against_the_entities_changed_through_the_api(
        servers: Callable[..., Server], make_db: Callable[..., JobDB], workers, small_index: Path,
        tmp_path: Path) -> None:
    """`el worker` follows the index folder's change log: an entity added through the API after the worker loaded
    is the answer of a job item that names it."""
    index = tmp_path / "index"
    shutil.copytree(small_index, index)
    db = make_db("worker-follows")
    api = servers(db, EL_JOBS__RUN_WORKER="false", EL_INDEX__DIR=str(index), EL_UPDATES__ENABLED="true",
                  EL_JOBS__POLL_INTERVAL_S="0.1")
    worker = workers(api)
    item = {"id": "z", "mention": "Zorblax Quintavian", "top_k": 3,
            "context": "Zorblax Quintavian, the Venusian painter, in his studio in 1931."}
    with api.client() as c:
        job_id = submit(c, [item]).json()["job_id"]  # the worker loads, then links it against the folder as built
        assert wait_job(c, job_id, finished, timeout_s=180, what="finish")["state"] == "succeeded"
        assert result_lines(c, job_id)[0]["result"]["entities"][0]["id"] != "live:zorblax"
        r = c.put("/v1/entities/live:zorblax", json={
            "name": "Zorblax Quintavian", "description": "Occupation: painter. Birth: 1890. Citizenship: Venus."})
        assert r.status_code == 200, r.text
        job_id = submit(c, [item]).json()["job_id"]
        assert wait_job(c, job_id, finished, timeout_s=60, what="finish")["state"] == "succeeded"
        result = result_lines(c, job_id)[0]["result"]
    assert result["entities"][0]["id"] == "live:zorblax" and result["index_version"] == r.json()["index_version"]
    assert worker.poll() is None
