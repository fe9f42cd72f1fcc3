"""Scale-out on Ray and PostgreSQL, with the real encoders and real mentions: a two-node ray.cluster_utils.Cluster
running 2 Serve replicas of the API and 2 job-worker actors over a PostgreSQL job store.

Ray binds the machine's network interface, not loopback, so the cluster runs in a private network namespace
(`unshare -n`, loopback only): this module runs tests/scaleout/driver.py there once and asserts on its report.
The embedded answers to compare with come from the same app in process (`create_app` over the session Linker).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.onnx, pytest.mark.scaleout]

DRIVER_TIMEOUT_S = 420


def _unshare_prefix() -> list[str]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare (util-linux) and ip (iproute2); .ci/run installs them")
    return ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]


@pytest.fixture(scope="module")
def mentions(test_mentions) -> list[dict[str, Any]]:
    """50 real WikiMEL test mentions as link requests."""
    return [{"mention": m.mention, "context": m.context, "top_k": 5} for m in test_mentions[:50]]


@pytest.fixture(scope="module")
def report(settings, mentions: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("ray", reason="the scale extra (ray[serve]) is not installed")
    pytest.importorskip("psycopg", reason="the scale extra (psycopg) is not installed")
    from tests.postgres import available

    if not available():
        pytest.fail("PostgreSQL binaries not found (.ci/run installs Debian's postgresql)")
    work = tmp_path_factory.mktemp("scaleout")
    (work / "mentions.json").write_text(json.dumps(mentions))
    index = work / "index"  # a private copy: the replicas write the entity changes' log into it
    shutil.copytree(settings.index.dir, index)
    out = work / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EL_")} | {
        "EL_ENCODER__ONNX_DIR": str(settings.encoder.onnx_dir), "EL_INDEX__DIR": str(index),
        "EL_DATA_DIR": str(settings.data_dir), "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    script = (f"ip link set lo up && exec {sys.executable} -m tests.scaleout.driver "
              f"--mentions {work / 'mentions.json'} --out {out}")
    log = work / "driver.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([*_unshare_prefix(), "bash", "-c", script], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(30)
            rc = -9
    text = log.read_text(errors="replace")
    assert out.exists(), f"driver wrote no report (exit {rc}):\n{text[-6000:]}"
    data = json.loads(out.read_text())
    assert rc == 0 and "total_s" in data, f"driver failed (exit {rc}); partial report {list(data)}:\n{text[-6000:]}"
    return data


@pytest.fixture(scope="module")
def embedded_answers(settings, linker, mentions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The embedded service (`el serve`'s app, in process) answering the same requests."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(settings, linker_factory=lambda _: linker)) as c:
        deadline = time.monotonic() + 120
        while c.get("/readyz").status_code != 200:  # the app warms the Linker up in the background
            assert time.monotonic() < deadline, c.get("/readyz").text
            time.sleep(0.1)
        out = []
        for m in mentions:
            r = c.post("/v1/link", json=m)
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out


def ranking(body: dict[str, Any]) -> tuple:
    return body["nil"], [e["id"] for e in body["entities"]]


def test_serve_answers_equal_the_embedded_service(report: dict[str, Any], embedded_answers: list[dict]) -> None:
    served = report["answers"]
    assert [a["status"] for a in served] == [200] * len(embedded_answers)
    assert [ranking(a["body"]) for a in served] == [ranking(b) for b in embedded_answers]
    # Scores equal up to float rounding: a request alone and one batched with others take different exact-search
    # paths (FAISS's scan, a GEMM: kg_index/exact.py), whose inner products differ in the 7th digit.
    for a, b in zip(served, embedded_answers):
        assert [e["score"] for e in a["body"]["entities"]] == pytest.approx(
            [e["score"] for e in b["entities"]], abs=1e-5)
    assert len({a["replica"] for a in served}) == 2  # both replicas answered some of them
    assert report["readyz"]["status"] == "ready"  # /readyz through Serve's proxy


def test_replicas_batch_under_concurrent_load(report: dict[str, Any]) -> None:
    b = report["batching"]
    assert b["ok"] == b["requests"] > 0
    assert len(b["per_replica"]) == 2, b
    for replica, m in b["per_replica"].items():
        assert m["count"] > 0 and m["sum"] / m["count"] > 1.0, (replica, m)  # mean mentions per link_batch call


def test_one_idempotency_key_through_two_replicas_makes_one_job(report: dict[str, Any]) -> None:
    idem = report["idempotency"]
    statuses = sorted(a[0] for a in idem["answers"])
    assert statuses == [200] * 7 + [202], idem
    assert len({a[1] for a in idem["answers"]}) == 1
    assert len({a[2] for a in idem["answers"]}) == 2, "the submissions did not reach both replicas"
    assert idem["jobs_in_db"] == 1 and idem["items_in_db"] == 4


def test_a_killed_worker_and_a_removed_node_lose_and_double_nothing(report: dict[str, Any]) -> None:
    f = report["job_faults"]
    n = f["items"]
    assert list(f["job"]) == ["succeeded", n, 0, n]
    assert list(f["results"]) == [n, n, n] and f["item_ids_without_result"] == 0  # one result per item id
    assert f["chunks_retried"] >= 1
    assert f["done_at_kill"] < n and f["done_at_remove_node"] < n  # both faults struck mid-job
    assert f["worker_a_restarted_pid"] != f["worker_a_old_pid"]  # Ray restarted the killed actor


def test_a_killed_replica_fails_only_its_in_flight_requests_and_is_replaced(report: dict[str, Any]) -> None:
    k = report["replica_kill"]
    assert k["replacement_served_after_s"] is not None and k["replacement_served_after_s"] <= 30.0, k
    assert k["ok_by_survivor_after_kill"] > 0
    # Every failure was a request already in flight when the replica died: it started before the kill, and there
    # can be at most one per client thread.
    assert len(k["failed"]) <= k["concurrency"], k["failed"]
    assert all(start < 0 for start, _, _, _ in k["failed"]), k["failed"]


def test_an_entity_change_through_one_replica_reaches_every_replica(report: dict[str, Any]) -> None:
    """EL_RAY__SHARED_INDEX=true: replicas on one host follow the index folder's change log."""
    e = report["entity_changes"]
    assert e["put"][0] == 200 and e["delete"][0] == 200, e
    assert len(e["seen_after_put"]) == e["replicas"] == 2, e
    assert all(v == [200, "live:zorblax", e["put"][1]] for v in e["seen_after_put"].values()), e
    assert len(e["seen_after_delete"]) == 2, e
    assert all(v[0] == 200 and v[1] != "live:zorblax" and v[2] == e["delete"][1]
               for v in e["seen_after_delete"].values()), e


def test_the_el_serve_and_el_worker_ray_commands(report: dict[str, Any]) -> None:
    """`el serve --ray --replicas 1` joins the cluster (EL_RAY__ADDRESS), deploys on the same proxy, answers, and
    deletes its app on SIGTERM; `el worker --ray --workers 1` runs a queued job and exits 0 on SIGTERM."""
    c = report["commands"]
    assert c["serve_new_replica"] is not None and c["serve_answer"] == 200
    assert c["serve_exit"] == 0 and "el" not in c["apps_after_serve_exit"]
    assert list(c["worker_job"]) == ["succeeded", 6, 6] and list(c["worker_job_results"]) == [6, 6]
    assert c["worker_exit"] == 0
