"""The scale-out checks, run in one two-node Ray cluster (ray.cluster_utils.Cluster) with a throwaway PostgreSQL job
store, and written to a JSON report that tests/scaleout/test_scaleout.py asserts on.

Run by that test under `unshare -n` (a private network namespace holding only loopback: Ray binds the machine's
interface otherwise). Settings (encoders, index, data) come from the EL_ environment the test passes.

    python -m tests.scaleout.driver --mentions mentions.json --out report.json

Layout: the head node (3 CPUs) runs Serve's controller and proxy, the 2 API replicas and job worker A; node 2
(1 CPU) runs job worker B. Steps: batching under concurrent load; the 50 answers; one Idempotency-Key through two
replicas at once; a job during which worker A is SIGKILLed and node 2 removed; SIGKILL of one replica under load;
an entity added and removed through the proxy, seen by every replica; then `el serve --ray` and `el worker --ray`
themselves, joining the cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger("scaleout")

CONCURRENCY = 16


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


class Load:
    """CONCURRENCY threads posting /v1/link in a loop; every request recorded (start, end, status, replica)."""

    def __init__(self, base: str, mentions: list[dict[str, Any]], per_thread: int | None = None) -> None:
        self.base, self.mentions, self.per_thread = base, mentions, per_thread
        self.records: list[tuple[float, float, int, str | None]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CONCURRENCY)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as c:
            n = 0
            while not self._stop.is_set() and (self.per_thread is None or n < self.per_thread):
                body = self.mentions[(i * 7 + n) % len(self.mentions)]
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/link", json=body)
                    rec = (t0, time.monotonic(), r.status_code, r.headers.get("x-el-replica"))
                except httpx.HTTPError:
                    rec = (t0, time.monotonic(), 0, None)
                with self._lock:
                    self.records.append(rec)
                n += 1

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self) -> None:
        for t in self._threads:
            t.join(120)


def replica_pids() -> dict[str, int]:
    """Replica id -> pid, read from each replica actor itself."""
    import ray

    out: dict[str, int] = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA::"):
            try:
                h = ray.get_actor(a["name"], namespace=a["namespace"])
                out[a["name"].rsplit("#", 1)[1]] = ray.get(h.__ray_call__.remote(lambda _: os.getpid()), timeout=10)
            except Exception:  # a replica that is going away  # noqa: BLE001
                logger.info("replica %s did not answer", a["name"])
    return out


def wait_ready(c: httpx.Client, n: int = 10, timeout_s: float = 300) -> float:
    """Until /readyz answers 200 through the proxy n times in a row."""
    t0 = time.monotonic()
    streak = 0
    while streak < n:
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError("the Serve app never became ready")
        try:
            streak = streak + 1 if c.get("/readyz").status_code == 200 else 0
        except httpx.HTTPError:
            streak = 0
        time.sleep(0.1 if streak else 0.5)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mentions", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=18120)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    mentions: list[dict[str, Any]] = json.loads(Path(args.mentions).read_text())
    report: dict[str, Any] = {}
    t_start = time.monotonic()

    from tests.postgres import LocalPostgres

    pg = LocalPostgres().start()
    cluster = None
    try:
        url = pg.create_database("scale")
        os.environ.update({
            "EL_HOST": "127.0.0.1", "EL_PORT": str(args.port), "EL_JOBS__DATABASE_URL": url,
            "EL_JOBS__DIR": tempfile.mkdtemp(prefix="el-scale-jobs-"), "EL_JOBS__RUN_WORKER": "false",
            "EL_JOBS__CHUNK_SIZE": "2", "EL_JOBS__LEASE_S": "3", "EL_JOBS__POLL_INTERVAL_S": "0.1",
            "EL_STAGE_DELAY_MS": "20", "EL_RAY__REPLICAS": "2", "EL_RAY__REPLICA_CPUS": "1",
            "EL_RAY__WORKER_CPUS": "1", "EL_LOG_LEVEL": "WARNING", "EL_RAY__SHARED_INDEX": "true",
        })
        import psycopg
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from service.scale.cluster import portable
        from service.scale.serve import deploy
        from service.scale.workers import worker_actor_class
        from service.settings import Settings

        settings = Settings()

        def db(sql: str, *a: Any) -> list[tuple]:
            with psycopg.connect(url, autocommit=True) as c:
                return [tuple(r) for r in c.execute(sql, a).fetchall()]

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"head": 1},
                                                                "include_dashboard": False})
        node2 = cluster.add_node(num_cpus=1, resources={"node2": 1})
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        report["cluster_s"] = time.monotonic() - t_start

        # Job workers first, so node 2's only CPU goes to worker B and both replicas land on the head.
        worker_cls = worker_actor_class(settings)
        shipped = portable(settings)
        wa = worker_cls.options(name="worker-a", resources={"head": 0.01}).remote(shipped)
        wb = worker_cls.options(name="worker-b", resources={"node2": 0.01}).remote(shipped)
        info_a, info_b = ray.get([wa.info.remote(), wb.info.remote()], timeout=300)
        report["workers"] = {"a": info_a, "b": info_b, "node2": node2.unique_id}
        deploy(settings)
        base = f"http://127.0.0.1:{args.port}"
        client = httpx.Client(base_url=base, timeout=60)
        report["ready_s"] = wait_ready(client)
        report["readyz"] = client.get("/readyz").json()
        pids = replica_pids()
        report["replicas"] = pids
        logger.info("ready after %.0f s: replicas %s", time.monotonic() - t_start, pids)

        # 1. Batching: concurrent load, then each replica's own el_batch_size (scrapes name their replica).
        load = Load(base, mentions, per_thread=12).start()
        load.join()
        batches: dict[str, dict[str, float]] = {}

        def scrape(_: int) -> tuple[str, dict[str, float]]:
            with httpx.Client(base_url=base, timeout=60) as c:  # a new connection: the proxy picks a replica
                r = c.get("/metrics")
            return r.headers.get("x-el-replica", "?"), {
                "sum": _metric(r.text, "el_batch_size_sum", kind="interactive"),
                "count": _metric(r.text, "el_batch_size_count", kind="interactive")}

        deadline = time.monotonic() + 60
        with ThreadPoolExecutor(8) as pool:  # bursts, for the reason every_replica (below) gives
            while len(batches) < len(pids) and time.monotonic() < deadline:
                batches.update(pool.map(scrape, range(8)))
        report["batching"] = {"requests": len(load.records), "ok": sum(r[2] == 200 for r in load.records),
                              "per_replica": batches}

        # 2. The answers, one request at a time.
        answers = []
        for m in mentions:
            r = client.post("/v1/link", json=m)
            answers.append({"status": r.status_code, "body": r.json(), "replica": r.headers.get("x-el-replica")})
        report["answers"] = answers

        # 3. One Idempotency-Key through two replicas at once (retried with a new key until both replicas answered).
        items = [{"id": f"idem-{i}", **mentions[i]} for i in range(4)]
        for attempt in range(5):
            key = f"same-key-{attempt}"
            barrier = threading.Barrier(8)
            answers_idem: list[tuple[int, str, str | None]] = []

            def post(key: str = key, barrier: threading.Barrier = barrier,
                     out: list[tuple[int, str, str | None]] = answers_idem) -> None:
                with httpx.Client(base_url=base, timeout=60) as c:
                    barrier.wait()
                    r = c.post("/v1/jobs", json={"items": items}, headers={"Idempotency-Key": key})
                    out.append((r.status_code, r.json().get("job_id", ""), r.headers.get("x-el-replica")))

            threads = [threading.Thread(target=post) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if len({a[2] for a in answers_idem}) >= 2:
                break
        report["idempotency"] = {"key": key, "answers": answers_idem,
                                 "jobs_in_db": db("SELECT count(*) FROM jobs WHERE idempotency_key = %s", key)[0][0],
                                 "items_in_db": db("SELECT count(*) FROM items i JOIN jobs j ON j.id = i.job_id "
                                                   "WHERE j.idempotency_key = %s", key)[0][0]}

        # 4. A job while worker A is SIGKILLed and node 2 (worker B's) is removed.
        job_items = [{"id": f"job-{i}", **mentions[i % len(mentions)]} for i in range(120)]
        job_id = client.post("/v1/jobs", json={"items": job_items}).json()["job_id"]

        def done() -> int:
            return db("SELECT done FROM jobs WHERE id = %s", job_id)[0][0]

        def holds_chunk(pid: int) -> bool:
            return db("SELECT count(*) FROM chunks WHERE job_id = %s AND state = 'running' AND lease_owner LIKE %s",
                      job_id, f"%:{pid}:%")[0][0] > 0

        def wait_for(cond: Any, what: str, timeout_s: float = 180) -> None:
            t0 = time.monotonic()
            while not cond():
                if time.monotonic() - t0 > timeout_s:
                    raise RuntimeError(f"timed out waiting for {what}")
                time.sleep(0.01)

        wait_for(lambda: done() >= 8 and holds_chunk(info_a["pid"]), "worker A mid-chunk")
        os.kill(info_a["pid"], signal.SIGKILL)
        killed_at = done()
        wait_for(lambda: done() >= killed_at + 8 and holds_chunk(info_b["pid"]), "worker B mid-chunk")
        cluster.remove_node(node2)
        removed_at = done()
        wait_for(lambda: db("SELECT state FROM jobs WHERE id = %s", job_id)[0][0] in ("succeeded", "failed",
                                                                                      "cancelled"), "job end", 240)
        restarted_a = ray.get(wa.info.remote(), timeout=60)
        report["job_faults"] = {
            "job_id": job_id, "items": len(job_items), "done_at_kill": killed_at, "done_at_remove_node": removed_at,
            "job": db("SELECT state, done, failed, total FROM jobs WHERE id = %s", job_id)[0],
            "results": db("SELECT count(*), count(DISTINCT seq), count(DISTINCT item_id) FROM results WHERE job_id = %s",
                          job_id)[0],
            "item_ids_without_result": db("SELECT count(*) FROM items i WHERE i.job_id = %s AND NOT EXISTS (SELECT 1 "
                                          "FROM results r WHERE r.job_id = i.job_id AND r.seq = i.seq)", job_id)[0][0],
            "chunks_retried": db("SELECT count(*) FROM chunks WHERE job_id = %s AND attempts > 1", job_id)[0][0],
            "worker_a_restarted_pid": restarted_a["pid"], "worker_a_old_pid": info_a["pid"],
        }

        # 5. SIGKILL of one replica under load: which requests fail, and when a replacement serves.
        pids = replica_pids()
        victim, victim_pid = min(pids.items())
        load = Load(base, mentions).start()
        time.sleep(3.0)
        t_kill = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        replacement_s = None
        while time.monotonic() - t_kill < 90:
            with load._lock:
                fresh = [r for r in load.records if r[2] == 200 and r[3] not in pids]
            if fresh:
                replacement_s = min(r[1] for r in fresh) - t_kill
                break
            time.sleep(0.1)
        time.sleep(2.0)
        load.stop()
        recs = load.records
        report["replica_kill"] = {
            "victim": victim, "concurrency": CONCURRENCY, "replacement_served_after_s": replacement_s,
            "requests": len(recs), "ok": sum(r[2] == 200 for r in recs),
            # (start, end) relative to the kill, status, replica of every request that did not get a 200
            "failed": [(r[0] - t_kill, r[1] - t_kill, r[2], r[3]) for r in recs if r[2] != 200],
            "ok_by_survivor_after_kill": sum(r[2] == 200 and r[0] > t_kill and r[3] in pids and r[3] != victim
                                             for r in recs),
        }
        # 5b. Entity changes through the proxy (EL_RAY__SHARED_INDEX=true: every replica follows the folder's log):
        # a change taken by one replica is in the next answer of each, and so is a removal.
        zorblax = {"mention": "Zorblax Quintavian", "top_k": 3,
                   "context": "Zorblax Quintavian, the Venusian painter, in his studio in 1931."}

        def one_answer() -> tuple[str, list]:
            with httpx.Client(base_url=base, timeout=60) as c:  # a new connection: the proxy picks a replica
                r = c.post("/v1/link", json=zorblax)
            body = r.json()
            return r.headers.get("x-el-replica", "?"), [r.status_code, body["entities"][0]["id"], body["index_version"]]

        def every_replica() -> dict[str, list]:
            """The first answer of each replica after the change. Bursts of concurrent requests, not one at a time:
            the proxy's router picks by the replicas' queue lengths, which it caches for seconds, so sequential
            requests can all go to one replica for a while (80 in a row did once, after the replica kill above)."""
            seen: dict[str, list] = {}
            want, deadline = len(replica_pids()), time.monotonic() + 60
            with ThreadPoolExecutor(8) as pool:
                while len(seen) < want and time.monotonic() < deadline:
                    for replica, answer in pool.map(lambda _: one_answer(), range(8)):
                        seen.setdefault(replica, answer)
            return seen

        put = client.put("/v1/entities/live:zorblax", json={
            "name": "Zorblax Quintavian", "description": "Occupation: painter. Birth: 1890. Citizenship: Venus."})
        seen_put = every_replica()
        removed = client.delete("/v1/entities/live:zorblax")
        report["entity_changes"] = {
            "replicas": len(replica_pids()), "put": [put.status_code, put.json().get("index_version")],
            "seen_after_put": seen_put, "delete": [removed.status_code, removed.json().get("index_version")],
            "seen_after_delete": every_replica()}

        # 6. The commands themselves, joining this cluster: `el serve --ray` redeploys the app (1 replica) on the
        # same proxy and deletes it on SIGTERM; `el worker --ray` runs a queued job and stops on SIGTERM.
        ray.kill(wa, no_restart=True)  # free a CPU on the head for the new replica
        before = set(replica_pids())  # the replicas now serving (the replacement from step 5 included)
        env = os.environ | {"EL_RAY__ADDRESS": cluster.address}
        serve_cli = subprocess.Popen([sys.executable, "-m", "service", "serve", "--ray", "--replicas", "1"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        new_replica = None
        while time.monotonic() - t0 < 180 and new_replica is None:
            try:
                r = client.get("/readyz")
                if r.status_code == 200 and r.headers.get("x-el-replica") not in before:
                    new_replica = r.headers.get("x-el-replica")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        served = client.post("/v1/link", json=mentions[0])
        serve_cli.send_signal(signal.SIGTERM)
        serve_rc = serve_cli.wait(120)
        apps_after = list(serve.status().applications)
        job2 = client_job = None
        from service.jobs.store_pg import PostgresJobStore

        store = PostgresJobStore.open(url, result_ttl_s=3600)
        try:
            job2, _ = store.create_job([(f"cli-{i}", json.dumps({"id": f"cli-{i}", **mentions[i]})) for i in range(6)],
                                       fingerprint="cli", idempotency_key=None, max_queued=100, chunk_size=2)
        finally:
            store.close()
        worker_cli = subprocess.Popen([sys.executable, "-m", "service", "worker", "--ray", "--workers", "1"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 180:
            client_job = db("SELECT state, done, total FROM jobs WHERE id = %s", job2.id)[0]
            if client_job[0] == "succeeded":
                break
            time.sleep(0.2)
        worker_cli.send_signal(signal.SIGTERM)
        worker_rc = worker_cli.wait(120)
        report["commands"] = {
            "serve_new_replica": new_replica, "serve_answer": served.status_code, "serve_exit": serve_rc,
            "apps_after_serve_exit": apps_after, "worker_job": client_job, "worker_exit": worker_rc,
            "worker_job_results": db("SELECT count(*), count(DISTINCT seq) FROM results WHERE job_id = %s", job2.id)[0],
        }
        report["total_s"] = time.monotonic() - t_start
        client.close()
        serve.shutdown()
    finally:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
            pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
