"""/v1/link latency idle vs while a large job runs, through a real server on loopback (micro-batching goal:
p99 during the job within 2x the idle p99).

    python scripts/bench_batching.py [--requests 200] [--clients 2] [--job-items 5000] [--env EL_X=Y ...]

Starts `python -m service serve` (the EL_ settings, a temporary job store, plus --env) and measures, in one run,
idle phases (client threads sending text-only WikiMEL test mentions to /v1/link, each waiting for its answer)
alternating with --rounds phases of the same load while a --job-items job (other WikiMEL test mentions, a JSONL
upload) runs: idle, job, idle, job, idle. Each job is cancelled when its phase is done (it need not finish).
Alternating lets drift in other load on a shared machine hit both sides alike. Reports p50/p99 per phase and
pooled, the ratio of the loaded p99 to the idle p99, the jobs' items/s meanwhile and the server's el_batch_size
histogram. Writes --out and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import local_server  # scripts/local_server.py (scripts/ is on sys.path when a script runs)

from kg_index.readers import read_mentions
from service.offline.bench import machine_info
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def start_server(store: Path, extra: dict[str, str]) -> tuple[subprocess.Popen, str]:
    return local_server.start_server(store, extra)


def load(url: str, bodies: list[dict], clients: int) -> list[float]:
    """Each client thread sends its share of bodies one after another; latencies in ms (all must be 200)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def run(share: list[dict]) -> None:
        with httpx.Client(base_url=url, timeout=60.0) as c:
            c.get("/healthz")  # connection open before timing
            for body in share:
                t = time.perf_counter()
                r = c.post("/v1/link", json=body)
                ms = (time.perf_counter() - t) * 1000
                if r.status_code != 200:
                    raise SystemExit(f"/v1/link answered {r.status_code}: {r.text[:200]}")
                with lock:
                    latencies.append(ms)

    threads = [threading.Thread(target=run, args=(bodies[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": pct(ms, 0.50), "p99_ms": pct(ms, 0.99), "mean_ms": round(statistics.fmean(ms), 2)}


def batch_sizes(url: str) -> dict[str, dict[str, float]]:
    """el_batch_size per kind: batches (count) and mentions (sum), from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        for part in ("count", "sum"):
            prefix = f"el_batch_size_{part}{{kind=\""
            if line.startswith(prefix):
                kind = line[len(prefix):].split('"', 1)[0]
                out.setdefault(kind, {})["batches" if part == "count" else "mentions"] = float(line.rsplit(" ", 1)[1])
    return out


def with_job(url: str, job_lines: str, measure: Callable[[], list[float]]) -> tuple[list[float], float, bool]:
    """Submit the job, wait until it has committed its first chunk, run `measure`, then cancel the job.
    Returns what `measure` returned, the job's items/s meanwhile (chunk-granular) and whether it ran throughout."""
    with httpx.Client(base_url=url, timeout=120.0) as c:
        r = c.post("/v1/jobs", content=job_lines.encode(), headers={"Content-Type": "application/x-ndjson"})
        r.raise_for_status()
        job_id = r.json()["job_id"]
        give_up = time.monotonic() + 120
        while (job := c.get(f"/v1/jobs/{job_id}").json())["progress"]["done"] == 0:
            if time.monotonic() > give_up or job["state"] in ("failed", "cancelled"):
                raise SystemExit(f"job did not start: {job}")
            time.sleep(0.05)
        done0, t0 = job["progress"]["done"], time.perf_counter()
        out = measure()
        job = c.get(f"/v1/jobs/{job_id}").json()
        rate = (job["progress"]["done"] - done0) / (time.perf_counter() - t0)
        running = job["state"] == "running"
        c.post(f"/v1/jobs/{job_id}/cancel")
        give_up = time.monotonic() + 120
        while c.get(f"/v1/jobs/{job_id}").json()["state"] == "running" and time.monotonic() < give_up:
            time.sleep(0.1)
    return out, rate, running


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="/v1/link requests per phase")
    ap.add_argument("--clients", type=int, default=2, help="concurrent client threads")
    ap.add_argument("--job-items", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2, help="job phases, each between two idle phases")
    ap.add_argument("--env", action="append", default=[], help="extra EL_X=Y for the server (repeatable)")
    ap.add_argument("--out", default="reports/bench-batching.json")
    args = ap.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.env)
    settings = Settings()
    mentions = read_mentions(settings.data_dir, "wikimel", "test")
    interactive = [{"mention": m.mention, "context": m.context} for m in mentions[: args.requests]]
    rest = mentions[args.requests:] or mentions
    job_lines = "".join(json.dumps({"id": str(i), "mention": m.mention, "context": m.context}) + "\n"
                        for i, m in ((i, rest[i % len(rest)]) for i in range(args.job_items)))

    idle_phases: list[list[float]] = []
    job_phases: list[list[float]] = []
    job_rates: list[float] = []
    still_running = True
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        proc, url = start_server(Path(tmp) / "jobs", extra)
        try:
            load(url, interactive[:10], 1)  # warm the connection path
            idle_phases.append(load(url, interactive, args.clients))
            for _ in range(args.rounds):
                during, rate, running = with_job(url, job_lines, lambda: load(url, interactive, args.clients))
                job_phases.append(during)
                job_rates.append(rate)
                still_running = still_running and running
                idle_phases.append(load(url, interactive, args.clients))
            sizes = batch_sizes(url)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    idle = [ms for phase in idle_phases for ms in phase]
    during = [ms for phase in job_phases for ms in phase]
    report = {
        "machine": machine_info() | {"load_avg_after": os.getloadavg()},
        "server_env": extra, "clients": args.clients, "requests_per_phase": args.requests, "rounds": args.rounds,
        "job_items": args.job_items, "job_running_throughout": still_running,
        "idle_phases": [summary(p) for p in idle_phases], "job_phases": [summary(p) for p in job_phases],
        "idle": summary(idle), "during_job": summary(during),
        "p99_ratio_during_job_to_idle": round(pct(during, 0.99) / pct(idle, 0.99), 3),
        "p50_ratio_during_job_to_idle": round(pct(during, 0.50) / pct(idle, 0.50), 3),
        "job_items_per_s_during": [round(r, 1) for r in job_rates],
        "batch_size": sizes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
