"""The /v1/jobs API over real HTTP against a real server and its job store, on each backend (jobs_server fixture)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.jobs.db import JobDB
from tests.jobs.helpers import db_rows, finished, many, metric, result_lines, submit, wait_idle, wait_job
from tests.service.conftest import Server

pytestmark = [pytest.mark.slow, pytest.mark.onnx]  # real servers over the real encoders (tests/jobs/conftest.py)


def test_submit_poll_and_stream_results_in_input_order(api: httpx.Client, job_items: list[dict]) -> None:
    items = job_items[:12]
    r = submit(api, items)
    assert r.status_code == 202, r.text
    body = r.json()
    assert set(body) == {"job_id", "state"} and body["state"] == "queued"
    assert r.headers["location"] == f"/v1/jobs/{body['job_id']}"
    job = wait_job(api, body["job_id"], finished, what="finish")
    assert job["state"] == "succeeded" and job["progress"] == {"done": 12, "total": 12, "failed": 0}
    assert job["attempts"] == 1 and job["error"] is None
    assert job["created_at"] <= job["started_at"] <= job["finished_at"] < job["expires_at"]
    lines = result_lines(api, body["job_id"])
    assert [line["id"] for line in lines] == [i["id"] for i in items]
    for line, item in zip(lines, items, strict=True):
        assert set(line) == {"id", "result"}
        assert line["result"]["mention"] == item["mention"] and 1 <= len(line["result"]["entities"]) <= 3
    # The same mention through /v1/link gives the same ranking: one pipeline behind both.
    single = api.post("/v1/link", json={k: v for k, v in items[0].items() if k != "id"}).json()
    assert [e["id"] for e in single["entities"]] == [e["id"] for e in lines[0]["result"]["entities"]]


def test_jsonl_json_and_multipart_with_one_key_are_one_job(api: httpx.Client, job_items: list[dict]) -> None:
    items = job_items[12:16]
    jsonl = "".join(json.dumps(i) + "\n" for i in items).encode()
    first = api.post("/v1/jobs", content=jsonl, headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": "fmt"})
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    again = [
        api.post("/v1/jobs", content=jsonl, headers={"Content-Type": "application/jsonl", "Idempotency-Key": "fmt"}),
        api.post("/v1/jobs", json={"items": items}, headers={"Idempotency-Key": "fmt"}),
        api.post("/v1/jobs", files={"file": ("items.jsonl", jsonl, "application/octet-stream")},
                 headers={"Idempotency-Key": "fmt"}),
    ]
    assert [(r.status_code, r.json()["job_id"]) for r in again] == [(200, job_id)] * 3
    wait_job(api, job_id, finished)
    assert [line["id"] for line in result_lines(api, job_id)] == [i["id"] for i in items]


def test_same_key_with_another_body_is_a_conflict(api: httpx.Client, job_items: list[dict]) -> None:
    assert submit(api, job_items[:2], key="conflict").status_code == 202
    r = submit(api, job_items[:3], key="conflict")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "idempotency_conflict"


def test_concurrent_duplicates_make_one_job_and_run_once(api: httpx.Client, jobs_server: Server, jobs_db: JobDB,
                                                         job_items: list[dict]) -> None:
    items = many(job_items, 16, "dup")
    wait_idle(api)
    ok_before = metric(api, "el_job_items_total", outcome="ok")
    answers: list[httpx.Response] = []
    barrier = threading.Barrier(8)

    def post() -> None:
        with jobs_server.client() as c:
            barrier.wait()
            answers.append(submit(c, items, key="concurrent"))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in answers) == [200] * 7 + [202]
    job_ids = {r.json()["job_id"] for r in answers}
    assert len(job_ids) == 1
    job_id = job_ids.pop()
    job = wait_job(api, job_id, finished)
    assert job["state"] == "succeeded" and job["attempts"] == 1
    assert db_rows(jobs_db, "SELECT count(*) FROM jobs WHERE idempotency_key = 'concurrent'") == [(1,)]
    assert db_rows(jobs_db, "SELECT count(*), count(DISTINCT seq) FROM results WHERE job_id = ?", job_id) == [(16, 16)]
    assert metric(api, "el_job_items_total", outcome="ok") - ok_before == 16  # one execution


def test_poison_items_fail_alone_with_their_codes(api: httpx.Client, job_items: list[dict]) -> None:
    with_image = [i for i in job_items if "image" in i]
    assert len(with_image) == 2
    text_only = [i for i in job_items if "image" not in i]
    good = [with_image[0], text_only[0], with_image[1], text_only[1]]
    bad = [
        {"id": "bad-image", "mention": "Paris", "image": "!!!not base64!!!"},
        {"id": "bad-png", "mention": "Paris", "image": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"},  # a truncated PNG
        {"id": "too-long", "mention": "x" * 2001},
        {"id": "empty", "mention": "   "},
    ]
    items = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], good[3]]
    wait_idle(api)
    errors_before = metric(api, "el_job_items_total", outcome="error")
    r = submit(api, items)
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["job_id"], finished)
    assert job["state"] == "succeeded" and job["progress"] == {"done": 8, "total": 8, "failed": 4}
    lines = {line["id"]: line for line in result_lines(api, job["job_id"])}
    assert lines["bad-image"]["error"]["code"] == "invalid_image"
    assert lines["bad-png"]["error"]["code"] == "invalid_image"
    assert lines["too-long"]["error"]["code"] == "text_too_long"
    assert lines["empty"]["error"]["code"] == "invalid_input"
    for item in good:
        assert lines[item["id"]]["result"]["entities"], item["id"]
    assert metric(api, "el_job_items_total", outcome="error") - errors_before == 4


def test_cancel_a_running_job_stops_its_output(api: httpx.Client, jobs_db: JobDB, job_items: list[dict]) -> None:
    items = many(job_items, 160, "cancel")
    wait_idle(api)
    cancelled_before = metric(api, "el_jobs", state="cancelled")
    job_id = submit(api, items).json()["job_id"]
    running = wait_job(api, job_id, lambda j: j["state"] == "running" and j["progress"]["done"] >= 8, what="progress")
    assert metric(api, "el_jobs", state="running") == 1
    r = api.get(f"/v1/jobs/{job_id}/results")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished" and "retry-after" in r.headers
    # The online API keeps answering while the worker is busy: the link is answered before the job is done.
    assert api.post("/v1/link", json={"mention": "Berlin"}).status_code == 200
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
    r = api.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    stored = db_rows(jobs_db, "SELECT count(*) FROM results WHERE job_id = ?", job_id)[0][0]
    time.sleep(1.0)  # several chunks' worth: nothing more may land
    assert db_rows(jobs_db, "SELECT count(*) FROM results WHERE job_id = ?", job_id)[0][0] == stored
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "cancelled" and running["progress"]["done"] <= job["progress"]["done"] == stored < 160
    lines = result_lines(api, job_id)
    assert [line["id"] for line in lines] == [i["id"] for i in items]
    assert sum("result" in line for line in lines) == stored
    assert {line["error"]["code"] for line in lines if "error" in line} == {"cancelled"}
    assert metric(api, "el_jobs", state="cancelled") == cancelled_before + 1
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"  # idempotent


def test_delete_a_running_job_cancels_it_then_removes_it_and_its_results(
        api: httpx.Client, jobs_db: JobDB, job_items: list[dict]) -> None:
    items = many(job_items, 160, "delete")
    wait_idle(api)
    job_id = submit(api, items, key="to-delete").json()["job_id"]
    wait_job(api, job_id, lambda j: j["state"] == "running" and j["progress"]["done"] >= 8, what="progress")
    r = api.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 204 and r.content == b"", r.text
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/results"):
        r = api.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (path, r.text)
    assert job_id not in {j["job_id"] for j in api.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]}
    time.sleep(1.0)  # several chunks' worth: the worker must not write results for (or recreate) the deleted job
    for table, col in (("jobs", "id"), ("items", "job_id"), ("chunks", "job_id"), ("results", "job_id")):
        assert db_rows(jobs_db, f"SELECT count(*) FROM {table} WHERE {col} = ?", job_id) == [(0,)], table
    # A second delete changes nothing and says so; cancelling a deleted job is a 404 too.
    r = api.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    # The worker survived: the next job runs to the end, and the key of the deleted job is free again.
    again = submit(api, job_items[:2], key="to-delete")
    assert again.status_code == 202 and again.json()["job_id"] != job_id
    assert wait_job(api, again.json()["job_id"], finished)["state"] == "succeeded"


def test_delete_a_finished_job_removes_its_results(api: httpx.Client, jobs_db: JobDB,
                                                   job_items: list[dict]) -> None:
    job_id = submit(api, job_items[:2]).json()["job_id"]
    wait_job(api, job_id, finished)
    assert len(result_lines(api, job_id)) == 2
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert api.get(f"/v1/jobs/{job_id}/results").status_code == 404
    assert db_rows(jobs_db, "SELECT count(*) FROM results WHERE job_id = ?", job_id) == [(0,)]


def test_list_jobs_newest_first_with_state_filter(api: httpx.Client, job_items: list[dict]) -> None:
    a = submit(api, job_items[:1]).json()["job_id"]
    b = submit(api, job_items[1:2]).json()["job_id"]
    wait_job(api, b, finished)
    jobs = api.get("/v1/jobs", params={"limit": 2}).json()["jobs"]
    assert [j["job_id"] for j in jobs] == [b, a]
    assert all(j["state"] == "succeeded" for j in api.get("/v1/jobs", params={"state": "succeeded"}).json()["jobs"])
    assert api.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_job_state_metrics_move(api: httpx.Client, job_items: list[dict]) -> None:
    wait_idle(api)
    before = metric(api, "el_jobs", state="succeeded")
    job_id = submit(api, job_items[:2]).json()["job_id"]
    wait_job(api, job_id, finished)
    assert metric(api, "el_jobs", state="succeeded") == before + 1
    assert metric(api, "el_jobs", state="queued") == 0


def test_bad_submissions_are_refused_before_anything_is_stored(api: httpx.Client, jobs_db: JobDB,
                                                               job_items: list[dict]) -> None:
    n_jobs = db_rows(jobs_db, "SELECT count(*) FROM jobs")[0][0]
    dup = submit(api, [job_items[0], job_items[0]])
    assert dup.status_code == 422 and dup.json()["error"]["code"] == "duplicate_item_id"
    bad_line = api.post("/v1/jobs", content=b'{"id": "a", "mention": "x"}\n{"mention": "no id"}\n',
                        headers={"Content-Type": "application/x-ndjson"})
    assert bad_line.status_code == 422 and bad_line.json()["error"]["message"].startswith("line 2: ")
    assert submit(api, []).status_code == 422
    assert api.post("/v1/jobs", content=b"a,b", headers={"Content-Type": "text/csv"}).status_code == 415
    assert api.post("/v1/jobs", files={"x": (None, "not a file")}).status_code == 422
    r = api.post("/v1/jobs", files={"file": ("a.jsonl", b'{"id": "a", "mention": "x"}\n'), "note": (None, "hi")})
    assert r.status_code == 422 and r.json()["error"]["message"] == "note: unknown form field; send one file part named file"
    r = api.post("/v1/jobs", files={"file": (None, '{"id": "a", "mention": "x"}')})  # a plain field, not a file part
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("multipart upload needs a file part")
    line = (json.dumps({"id": "0", "mention": "m" * 1000}) + "\n").encode()
    big = line * (2 * 1024 * 1024 // len(line) + 1)  # over this server's 2 MB job body cap
    r = api.post("/v1/jobs", content=big, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    chunked = api.post("/v1/jobs", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                       headers={"Content-Type": "application/x-ndjson"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "payload_too_large"
    assert db_rows(jobs_db, "SELECT count(*) FROM jobs")[0][0] == n_jobs
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/results"):
        r = api.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    assert api.delete("/v1/jobs/nope").json()["error"]["code"] == "job_not_found"
    assert api.post("/v1/jobs/nope/cancel").json()["error"]["code"] == "job_not_found"
