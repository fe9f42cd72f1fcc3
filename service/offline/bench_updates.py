"""`el bench-updates`: entity-change throughput while /v1/link serves, through a real server on loopback.

Starts `python -m service serve` over a private copy of the configured index (hard links to its files: nothing
writes into an existing index file, the change log and compaction make new ones), then alternates idle phases
(client threads sending text-only WikiMEL test mentions to /v1/link, each waiting for its answer) with phases of
the same link load while clients stream POST /v1/entities:batch calls of new entities (one stream per server process by default; real KB names and
descriptions under new ids): text-only, then each with a real photo (the WikiMEL release's images, base64). Before
each loaded phase, a few change calls run with no link load (the update path's own rate on the machine at that
moment). Reports the entities acknowledged per second in each phase, the link p50/p99 of every phase, and the ratio
of the loaded p99 to the idle p99 (idle phases pooled, taken before and after each loaded one on the same server).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import httpx

from kg_index.changelog import LOG_NAME
from kg_index.readers import read_mel_kb, read_mentions
from service.offline.bench import machine_info
from service.settings import Settings

logger = logging.getLogger(__name__)

JSON = {"content-type": "application/json"}
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Options:
    requests: int = 150  # /v1/link requests per phase
    clients: int = 2
    batch: int = 32  # entities per POST /v1/entities:batch
    rounds: int = 1  # text-only and image phases, each between idle ones
    alone_calls: int = 8  # change calls timed without link load before each loaded phase
    update_clients: int | None = None  # concurrent change streams, one call at a time each (None: one per process)
    workers: int | None = None  # server processes (EL_WORKERS; None: what `el serve` runs here, auto by default)
    out: Path = Path("reports/updates.json")


def private_copy(src: Path, dst: Path) -> None:
    """A copy of an index folder that shares the big files (hard links; a copy across file systems). Safe because
    nothing rewrites an index file in place; the change log is never shared."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == LOG_NAME or not f.is_file():
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    if (src / LOG_NAME).is_file():
        shutil.copy2(src / LOG_NAME, dst / LOG_NAME)


def start_server(index_dir: Path, work: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full = os.environ | {"EL_HOST": "127.0.0.1", "EL_PORT": str(port), "EL_INDEX__DIR": str(index_dir),
                         "EL_JOBS__DIR": str(work / "jobs"), "EL_LOG_LEVEL": "WARNING",
                         "EL_SHUTDOWN__DRAIN_DELAY_S": "0"} | env
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=full, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    give_up = time.monotonic() + 300
    with httpx.Client(base_url=url, timeout=2.0) as c:
        while time.monotonic() < give_up:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}: {(work / 'server.log').read_text()[-2000:]}")
            try:
                if c.get("/readyz").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready within 300 s")


def link_load(url: str, bodies: list[dict], clients: int) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def run(share: list[dict]) -> None:
        with httpx.Client(base_url=url, timeout=60.0) as c:
            c.get("/healthz")
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


Batch = tuple[int, bytes]  # entities in the call, its JSON body


def with_updates(url: str, batches: Iterable[Batch], measure, streams: int = 1) -> tuple[list[float], dict]:
    """Stream the batches (`streams` clients, one call at a time each) while `measure` runs; entities acknowledged
    per second meanwhile."""
    stop = threading.Event()
    done = {"entities": 0, "calls": 0, "errors": 0, "last_version": None}
    lock = threading.Lock()
    source = iter(batches)

    def update() -> None:
        with httpx.Client(base_url=url, timeout=120.0) as c:
            while not stop.is_set():
                with lock:
                    item = next(source, None)
                if item is None:
                    raise SystemExit("bench-updates: ran out of entities to add; raise --batch or lower --requests")
                n, body = item
                r = c.post("/v1/entities:batch", content=body, headers=JSON)
                with lock:
                    if r.status_code != 200:
                        done["errors"] += 1
                        logger.error("entities:batch answered %s: %s", r.status_code, r.text[:200])
                        continue
                    done["entities"] += n
                    done["calls"] += 1
                    done["last_version"] = max([done["last_version"] or "", r.json()["index_version"]],
                                               key=lambda v: int(v.rpartition("+")[2] or 0))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=update, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    out = measure()
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    return out, {**done, "seconds": round(elapsed, 2), "entities_per_s": round(done["entities"] / elapsed, 1)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process (all its threads) and of its live descendants (worker processes,
    the entity batch decoding process), from /proc."""
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
    ours, grew = {pid}, True
    while grew:
        more = {p for p, f in stats.items() if int(f[1]) in ours} - ours
        ours |= more
        grew = bool(more)
    total = sum(int(stats[p][11]) + int(stats[p][12]) for p in ours if p in stats)
    return total / os.sysconf("SC_CLK_TCK")


def updates_alone(url: str, batches: Iterable[Batch], pid: int) -> dict:
    """The same change calls with no link load: the update path's own rate on this machine, now (the baseline of
    the rate under load), and the server's CPU time per entity (what the rate would be on a core of its own,
    whatever else the machine is running)."""
    t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
    n = 0
    with httpx.Client(base_url=url, timeout=120.0) as c:
        for k, body in batches:
            r = c.post("/v1/entities:batch", content=body, headers=JSON)
            if r.status_code != 200:
                raise SystemExit(f"entities:batch answered {r.status_code}: {r.text[:200]}")
            n += k
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {"entities": n, "seconds": round(elapsed, 2), "entities_per_s": round(n / elapsed, 1),
            "server_cpu_ms_per_entity": round(1000 * cpu / n, 2), "entities_per_cpu_s": round(n / cpu, 1)}


def idle_phase(url: str, bodies: list[dict], clients: int, pid: int) -> tuple[list[float], dict]:
    """One phase of link load alone, with the cores it kept busy: the server's (all its processes) and this
    process's (the link clients), CPU seconds per second of the phase. What is left of the machine is what entity
    changes can take without slowing links."""
    t0, server0, clients0 = time.perf_counter(), cpu_seconds(pid), time.process_time()
    latencies = link_load(url, bodies, clients)
    wall = time.perf_counter() - t0
    return latencies, {"server_cores": round((cpu_seconds(pid) - server0) / wall, 3),
                       "client_cores": round((time.process_time() - clients0) / wall, 3)}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": pct(ms, 0.50), "p99_ms": pct(ms, 0.99), "mean_ms": round(statistics.fmean(ms), 2)}


def run(settings: Settings, opts: Options) -> dict:
    from service.offline.bench_http import wait_workers_ready
    from service.prefork import worker_count

    workers = opts.workers or worker_count(settings)  # the default: the server `el serve` runs here
    # A client with many changes sends them as one stream per server process by default: each process has one
    # update worker, and a stream's calls go one at a time to the process its connection reached.
    streams = opts.update_clients or workers
    mentions = read_mentions(settings.data_dir, "wikimel", "test")
    bodies = [{"mention": m.mention, "context": m.context} for m in mentions[: opts.requests]]
    kb = read_mel_kb(settings.data_dir)
    cap = settings.limits.max_image_bytes
    files = sorted((settings.data_dir / "WikiMEL" / "images").glob("*.jpg"))  # the release's real photos
    photos = [base64.b64encode(b).decode() for b in (f.read_bytes() for f in files) if len(b) <= cap * 3 // 4][:200]
    if not photos:
        raise SystemExit(f"no image found under {settings.data_dir / 'WikiMEL' / 'images'}")

    photo_json = [b', "image": ' + json.dumps(p).encode() for p in photos]

    def batches(prefix: str, with_image: bool) -> Iterator[Batch]:
        """Bodies built as the calls go, from JSON pieces encoded once: json.dumps of a 30 MB photo batch would
        hold this process's GIL for ~100 ms and stall its /v1/link clients, billing the bench to the server."""
        for start in range(0, 20_000, opts.batch):
            parts = [json.dumps({"id": f"{prefix}{i}", "name": e.name, "description": e.description})[:-1].encode()
                     + (photo_json[i % len(photos)] if with_image else b"") + b"}"
                     for i, e in enumerate(kb[start : start + opts.batch], start)]
            yield len(parts), b"[" + b",".join(parts) + b"]"

    if settings.updates.int8_encoder:  # made before the server starts, so that no phase pays the quantisation
        from models.export import ensure_int8_entity_encoder

        ensure_int8_entity_encoder(settings.encoder.onnx_dir)
    machine = machine_info()  # the load average before the run
    idle_cpu: list[tuple[list[float], dict]] = []  # each idle phase's latencies and the cores it kept busy
    loaded: dict[str, list[list[float]]] = {"text": [], "image": []}
    rates: dict[str, list[dict]] = {"text": [], "image": []}
    alone: dict[str, list[dict]] = {"text": [], "image": []}
    with tempfile.TemporaryDirectory(prefix="bench-updates-") as tmp:
        work = Path(tmp)
        index_dir = work / "index"
        private_copy(settings.index.dir, index_dir)
        proc, url = start_server(index_dir, work, {"EL_UPDATES__COMPACT_AFTER": "0", "EL_WORKERS": str(workers)})
        wait_workers_ready(url, workers)  # /readyz answers once one of them is
        try:
            link_load(url, bodies[:10], 1)  # warm the connection path
            idle_cpu.append(idle_phase(url, bodies, opts.clients, proc.pid))
            for r in range(opts.rounds):
                for kind in ("text", "image"):
                    alone[kind].append(updates_alone(url, islice(batches(f"alone-{kind}-{r}-", kind == "image"), opts.alone_calls),
                                                     proc.pid))
                    during, rate = with_updates(url, batches(f"bench-{kind}-{r}-", kind == "image"),
                                                lambda: link_load(url, bodies, opts.clients), streams)
                    loaded[kind].append(during)
                    rates[kind].append(rate)
                    idle_cpu.append(idle_phase(url, bodies, opts.clients, proc.pid))
            check = httpx.get(f"{url}/v1/entities/bench-image-0-0", timeout=10).json()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    idle = [lat for lat, _ in idle_cpu]
    idle_all = [ms for p in idle for ms in p]
    cores = {k: round(statistics.fmean(c[k] for _, c in idle_cpu), 3) for k in ("server_cores", "client_cores")}
    report: dict = {
        "machine": machine | {"load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "index": str(settings.index.dir), "clients": opts.clients, "requests_per_phase": opts.requests,
        "entities_per_call": opts.batch, "rounds": opts.rounds, "update_clients": streams,
        "server_workers": workers,
        "update_encoder": "int8" if settings.updates.int8_encoder else "fp32",  # EL_UPDATES__INT8_ENCODER
        "update_nice": settings.updates.nice,  # EL_UPDATES__NICE
        "update_encoder_threads": settings.updates.encoder_threads,  # EL_UPDATES__ENCODER_THREADS
        "idle_phases": [summary(p) | c for p, c in idle_cpu], "idle": summary(idle_all), "check_entity": check,
        # the CPU budget: the cores the link load alone keeps busy (mean over the idle phases), the machine's, and
        # (below) the cores the update rates take at the server CPU per entity measured alone
        "idle_cores": cores, "cpus": len(os.sched_getaffinity(0)),
    }
    for kind in ("text", "image"):
        during = [ms for p in loaded[kind] for ms in p]
        report[f"during_{kind}_updates"] = summary(during)
        report[f"{kind}_updates"] = rates[kind]
        report[f"{kind}_entities_per_s"] = round(statistics.fmean(r["entities_per_s"] for r in rates[kind]), 1)
        report[f"{kind}_updates_alone"] = alone[kind]
        report[f"{kind}_entities_per_s_alone"] = round(statistics.fmean(r["entities_per_s"] for r in alone[kind]), 1)
        report[f"{kind}_entities_per_server_cpu_s"] = round(statistics.fmean(r["entities_per_cpu_s"] for r in alone[kind]), 1)
        report[f"p99_ratio_{kind}_updates_to_idle"] = round(pct(during, 0.99) / pct(idle_all, 0.99), 3)
        report[f"p50_ratio_{kind}_updates_to_idle"] = round(pct(during, 0.50) / pct(idle_all, 0.50), 3)
    report["cores_for_goal_rates"] = {  # text-only at 200/s, photos at 50/s (issue 19's goals)
        "text_200_per_s": round(200 / report["text_entities_per_server_cpu_s"], 2),
        "image_50_per_s": round(50 / report["image_entities_per_server_cpu_s"], 2)}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    return report
