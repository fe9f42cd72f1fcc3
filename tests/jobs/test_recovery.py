"""Crash and shutdown: a job survives SIGKILL and SIGTERM of its server and completes exactly once after a
restart on the same job store, on each backend (reliability.md F2, F3)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests.jobs.db import JobDB
from tests.jobs.helpers import db_rows, finished, many, result_lines, submit, wait_job
from tests.service.conftest import Server

pytestmark = [pytest.mark.slow, pytest.mark.onnx]  # real servers over the real encoders (tests/jobs/conftest.py)


# Each chunk of 2 sleeps 150 ms in the encode stage: a 30-item job takes over 2 s, time to kill it mid-way.
CRAWL = {"EL_STAGE_DELAY_MS": "150", "EL_JOBS__CHUNK_SIZE": "2"}


def assert_complete_exactly_once(server: Server, store: JobDB, job_id: str, items: list[dict]) -> dict:
    with server.client() as c:
        job = wait_job(c, job_id, finished, what="finish after restart")
        assert job["state"] == "succeeded" and job["progress"] == {"done": len(items), "total": len(items), "failed": 0}
        lines = result_lines(c, job_id)
    assert [line["id"] for line in lines] == [i["id"] for i in items]
    assert all("result" in line for line in lines)
    n, distinct = db_rows(store, "SELECT count(*), count(DISTINCT seq) FROM results WHERE job_id = ?", job_id)[0]
    assert n == distinct == len(items)
    return job


def test_sigkill_mid_job_then_restart_completes_with_one_result_per_item(
        servers: Callable[..., Server], make_db: Callable[..., JobDB], job_items: list[dict]) -> None:
    store = make_db()
    first = servers(store, **CRAWL)
    items = many(job_items, 30, "kill")
    with first.client() as c:
        job_id = submit(c, items, key="kill-me").json()["job_id"]
        wait_job(c, job_id, lambda j: j["progress"]["done"] >= 6, what="progress before the kill")
    # Killed while a chunk is leased (each takes 150 ms or more), not in the few ms between one chunk's commit and the
    # next one's lease, where no chunk would run twice.
    deadline = time.monotonic() + 10.0
    while not db_rows(store, "SELECT count(*) FROM chunks WHERE job_id = ? AND state = 'running'", job_id)[0][0]:
        assert time.monotonic() < deadline, "no chunk of the job was ever seen running"
        time.sleep(0.002)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    state, done, lease_owner = db_rows(store, "SELECT state, done, lease_owner FROM jobs WHERE id = ?", job_id)[0]
    assert state == "running" and lease_owner is not None and 6 <= done < 30  # left behind by the dead worker
    assert db_rows(store, "SELECT count(*) FROM results WHERE job_id = ?", job_id)[0][0] == done

    second = servers(store, EL_JOBS__CHUNK_SIZE=2)
    job = assert_complete_exactly_once(second, store, job_id, items)
    assert job["attempts"] == 2  # the chunk in flight at the kill ran twice; the others once
    assert db_rows(store, "SELECT count(*) FROM chunks WHERE job_id = ? AND attempts > 1", job_id)[0][0] >= 1
    with second.client() as c:  # a client retrying its submission after the crash still gets the same job
        assert submit(c, items, key="kill-me").json()["job_id"] == job_id
    assert db_rows(store, "SELECT count(*) FROM jobs WHERE state = 'running'") == [(0,)]


def test_sigterm_with_queued_jobs_then_restart_completes_them(
        servers: Callable[..., Server], make_db: Callable[..., JobDB], job_items: list[dict]) -> None:
    store = make_db()
    first = servers(store, **CRAWL)
    batches = [many(job_items, 20, f"term{j}") for j in range(3)]
    with first.client() as c:
        job_ids = [submit(c, items).json()["job_id"] for items in batches]
        wait_job(c, job_ids[0], lambda j: j["progress"]["done"] >= 2, what="first job running")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0, first.log()[-3000:]
    states = dict(db_rows(store, "SELECT id, state FROM jobs"))
    assert "running" not in states.values()  # the worker handed its job back on the way out
    assert [states[j] for j in job_ids[1:]] == ["queued", "queued"]
    # Nothing was leased at exit: the worker committed its chunk and no chunk ran more than once.
    assert db_rows(store, "SELECT count(*), max(attempts) FROM chunks WHERE state = 'running'")[0][0] == 0
    assert db_rows(store, "SELECT max(attempts) FROM chunks")[0][0] == 1

    second = servers(store, EL_JOBS__CHUNK_SIZE=8)
    for job_id, items in zip(job_ids, batches, strict=True):
        job = assert_complete_exactly_once(second, store, job_id, items)
        assert job["attempts"] == 1
