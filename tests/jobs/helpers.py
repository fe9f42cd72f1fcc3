"""Helpers for the job tests: start a server on a given job store, submit, poll, read results, the store's rows, metrics."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.jobs.db import JobDB
from tests.service.conftest import Server, launch, wait_until

# Slow enough that a job of a few dozen items takes seconds, fast enough to keep the suite short.
SLOW = {"EL_STAGE_DELAY_MS": "40", "EL_JOBS__CHUNK_SIZE": "4", "EL_JOBS__POLL_INTERVAL_S": "0.1"}


def start_server(settings, db: JobDB, **env: object) -> Server:
    overrides = {**db.env, "EL_JOBS__POLL_INTERVAL_S": "0.1", "EL_SHUTDOWN__DRAIN_DELAY_S": "0"}
    overrides.update({k: str(v) for k, v in env.items()})
    server = launch(settings, overrides)
    wait_until(server)
    return server


def many(items: list[dict[str, Any]], n: int, tag: str) -> list[dict[str, Any]]:
    """n items cycling through the real mentions, with unique ids (text only: keeps bodies small)."""
    return [{k: v for k, v in items[i % len(items)].items() if k != "image"} | {"id": f"{tag}-{i}"} for i in range(n)]


def submit(client: httpx.Client, items: list[dict[str, Any]], key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/jobs", json={"items": items}, headers=headers)


def wait_job(client: httpx.Client, job_id: str, until: Callable[[dict], bool], *, timeout_s: float = 60.0,
             what: str = "condition") -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if until(job):
            return job
        time.sleep(0.05)
    pytest.fail(f"job {job_id}: {what} not reached within {timeout_s} s; last {job}")


def finished(job: dict) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def result_lines(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/jobs/{job_id}/results")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def db_rows(db: JobDB, sql: str, *args: object) -> list[tuple]:
    return db.rows(sql, *args)


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def wait_idle(client: httpx.Client, timeout_s: float = 60.0) -> None:
    """Until no job is queued or running (so metric deltas belong to the next job only)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metric(client, "el_jobs", state="queued") + metric(client, "el_jobs", state="running") == 0:
            return
        time.sleep(0.05)
    pytest.fail(f"jobs still queued or running after {timeout_s} s")
