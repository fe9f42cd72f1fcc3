"""Throughput of a batch job through the server vs the in-process batched pipeline, on the same machine.

    python scripts/bench_jobs.py [--n 5000] [--chunk-size 64] [--url URL] [--out reports/bench-jobs.json]

Both sides link the same N WikiMEL test mentions (text only: few test mentions have a local image) with the
index and encoders of the EL_ settings. The in-process side calls Linker.link_batch on prebuilt queries in
chunks of --chunk-size (the strictest baseline: no decode, no JSON, no storage); in-process and server runs
alternate (--repeats server jobs, each between two in-process runs) and each side reports its median, so other
load on a shared machine hits both alike. The server side is `python -m service serve` started here with a temporary job
store and EL_JOBS__CHUNK_SIZE = --chunk-size (or --url, a server you started), timed from the POST of the
JSONL file to the job's "succeeded". Wall time is what the goal is about; CPU seconds per mention (this
process for in-process, the server process from /proc for the job) are reported too because they are far
less sensitive to other load on a shared machine. Prints one JSON report and writes it to --out.
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
import time
from pathlib import Path

import httpx
import local_server  # scripts/local_server.py (scripts/ is on sys.path when a script runs)

from kg_index.readers import read_mentions
from service.offline.bench import machine_info
from service.pipeline.linker import Linker
from service.pipeline.types import LinkQuery
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(linker: Linker, queries: list[LinkQuery], chunk: int) -> tuple[float, float, list[str | None]]:
    """Wall seconds, CPU seconds and top-1 ids of linking queries in chunks (prebuilt queries: no decode, no I/O)."""
    top1: list[str | None] = []
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(queries), chunk):
        for r in linker.link_batch(queries[i : i + chunk]).results:
            top1.append(r.entities[0].id if r.entities else None)
    return time.perf_counter() - t, time.process_time() - cpu, top1


def start_server(chunk: int, store: Path) -> tuple[subprocess.Popen, str]:
    return local_server.start_server(store, {"EL_JOBS__CHUNK_SIZE": str(chunk)})


def through_server(url: str, jsonl: Path, n: int, pid: int | None) -> tuple[dict, list[str | None]]:
    with httpx.Client(base_url=url, timeout=600.0) as c:
        cpu0 = proc_cpu_s(pid) if pid else None
        t0 = time.perf_counter()
        with jsonl.open("rb") as f:
            r = c.post("/v1/jobs", content=f, headers={"Content-Type": "application/x-ndjson"})
        r.raise_for_status()
        job_id = r.json()["job_id"]
        submitted = time.perf_counter()
        while True:
            job = c.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.1)
        finished = time.perf_counter()
        cpu_s = proc_cpu_s(pid) - cpu0 if pid and cpu0 is not None else None
        lines = [json.loads(line) for line in c.get(f"/v1/jobs/{job_id}/results").text.splitlines()]
        downloaded = time.perf_counter()
    if job["state"] != "succeeded" or len(lines) != n:
        raise SystemExit(f"job {job_id} ended {job['state']} with {len(lines)} lines: {job}")
    top1 = [(line["result"]["entities"] or [{}])[0].get("id") if "result" in line else None for line in lines]
    return {"job_id": job_id, "submit_s": round(submitted - t0, 3), "seconds": round(finished - t0, 3),
            "download_s": round(downloaded - finished, 3), "failed_items": job["progress"]["failed"],
            "cpu_s": None if cpu_s is None else round(cpu_s, 2)}, top1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="mentions (WikiMEL test, in file order; cycled if fewer)")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--url", default=None, help="use this running server instead of starting one")
    ap.add_argument("--repeats", type=int, default=1, help="server jobs, each followed by another in-process run")
    ap.add_argument("--out", default="reports/bench-jobs.json")
    args = ap.parse_args(argv)
    settings = Settings()
    machine = machine_info()  # the load average before the run
    mentions = read_mentions(settings.data_dir, "wikimel", "test")
    picked = [mentions[i % len(mentions)] for i in range(args.n)]
    items = [{"id": f"{i}:{m.id}", "mention": m.mention, "context": m.context, "top_k": settings.top_k}
             for i, m in enumerate(picked)]
    queries = [LinkQuery(m.mention, m.context, None, top_k=settings.top_k, id=it["id"]) for m, it in zip(picked, items)]

    linker = Linker.from_settings(settings)
    linker.warm_up()
    index = {"version": linker.index.version, "entities": len(linker.index), "dir": str(settings.index.dir),
             "faiss": linker.index.manifest.faiss_factory}
    # In-process and server runs alternate (L S L S ... L) so that other load on the machine hits both alike;
    # each side is summarised by its median.
    local: list[tuple[float, float]] = []
    server: list[dict] = []
    wall, cpu, top1_local = in_process(linker, queries, args.chunk_size)
    local.append((wall, cpu))
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        jsonl = Path(tmp) / "items.jsonl"
        jsonl.write_text("".join(json.dumps(it) + "\n" for it in items))
        proc = None
        url = args.url
        if url is None:
            proc, url = start_server(args.chunk_size, Path(tmp) / "jobs")
        try:
            for _ in range(args.repeats):
                run, top1_server = through_server(url, jsonl, args.n, proc.pid if proc is not None else None)
                server.append(run)
                wall, cpu, _ = in_process(linker, queries, args.chunk_size)
                local.append((wall, cpu))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)

    local_mps = args.n / statistics.median(w for w, _ in local)
    server_mps = args.n / statistics.median(r["seconds"] for r in server)
    server_cpu = [r["cpu_s"] for r in server if r["cpu_s"] is not None]
    report = {
        "machine": machine | {"load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "index": index, "n": args.n, "chunk_size": args.chunk_size, "images": False, "repeats": args.repeats,
        "in_process": {"seconds": [round(w, 2) for w, _ in local], "cpu_s": [round(c, 2) for _, c in local],
                       "mentions_per_s": round(local_mps, 1)},
        "server": {"runs": server, "mentions_per_s": round(server_mps, 1),
                   "url": args.url or "started by this script"},
        "ratio_server_to_in_process": round(server_mps / local_mps, 3),
        "cpu_ratio_in_process_to_server": (round(statistics.median(c for _, c in local) / statistics.median(server_cpu), 3)
                                           if server_cpu else None),
        "top1_agreement": round(sum(a == b for a, b in zip(top1_local, top1_server, strict=True)) / args.n, 4),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
