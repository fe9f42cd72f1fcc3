"""Result expiry (410, then 404 and no rows left) and the queued-job cap (429 + Retry-After), on one server
with a 1 s result TTL, a fast sweep and room for one queued job (reliability.md G4, A1 for jobs)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.jobs.db import JobDB
from tests.jobs.helpers import db_rows, finished, many, result_lines, start_server, submit, wait_idle, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.onnx]  # real servers over the real encoders (tests/jobs/conftest.py)


@pytest.fixture(scope="module")
def store(make_db: Callable[..., JobDB]) -> JobDB:
    return make_db("jobs-limits")


@pytest.fixture(scope="module")
def client(settings, store: JobDB) -> Iterator[httpx.Client]:
    server = start_server(settings, store, EL_JOBS__RESULT_TTL_S=1, EL_JOBS__SWEEP_INTERVAL_S=0.2,
                          EL_JOBS__MAX_QUEUED=1, EL_JOBS__RETRY_AFTER_S=7, EL_STAGE_DELAY_MS=100, EL_JOBS__CHUNK_SIZE=2)
    with server.client() as c:
        yield c
    server.stop()


def test_results_expire_then_every_row_is_deleted(client: httpx.Client, store: JobDB, job_items: list[dict]) -> None:
    items = job_items[:2]
    job_id = submit(client, items, key="short-lived").json()["job_id"]
    job = wait_job(client, job_id, finished)
    assert job["state"] == "succeeded" and job["expires_at"] is not None
    assert [line["id"] for line in result_lines(client, job_id)] == [i["id"] for i in items]
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}")
        if not seen or seen[-1] != r.status_code:
            seen.append(r.status_code)
        if r.status_code == 410:
            assert r.json()["error"]["code"] == "job_expired"
        if r.status_code == 404:
            assert r.json()["error"]["code"] == "job_not_found"
            break
        time.sleep(0.02)
    assert seen[0] == 200 and seen[-1] == 404 and set(seen) <= {200, 410, 404}, seen
    assert client.get(f"/v1/jobs/{job_id}/results").status_code == 404
    assert db_rows(store, "SELECT count(*) FROM jobs WHERE id = ?", job_id) == [(0,)]
    for table in ("items", "chunks", "results"):
        assert db_rows(store, f"SELECT count(*) FROM {table} WHERE job_id = ?", job_id) == [(0,)]
    # The key is free again once its job is gone.
    assert submit(client, items, key="short-lived").status_code == 202


def test_a_full_job_queue_answers_429_with_retry_after(client: httpx.Client, job_items: list[dict]) -> None:
    wait_idle(client)
    running = submit(client, many(job_items, 40, "busy")).json()["job_id"]
    wait_job(client, running, lambda j: j["state"] == "running", what="running")
    queued = submit(client, job_items[:1])
    assert queued.status_code == 202 and queued.json()["state"] == "queued"
    r = submit(client, job_items[1:2])
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "job_queue_full" and r.headers["retry-after"] == "7"
    for job_id in (running, queued.json()["job_id"]):
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    assert submit(client, job_items[1:2]).status_code == 202  # room again
