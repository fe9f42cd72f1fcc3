"""The served pipeline over HTTP: a real server (`python -m service serve`) started on loopback, driven by wrk
with single POST /v1/link requests (text only, cycling through the bench's mentions) at a few concurrencies.

wrk runs on the same machine and takes CPU from the server: the rows say so. The server's CPU per mention comes
from its /proc stat (utime + stime over the run). H@1 is not re-measured under load: the server runs the same
Linker as the in-process rows; a few mentions linked over HTTP first check that it answers the same top-1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kg_index.records import Mention
from service.offline.bench import Row
from service.settings import Settings

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0

# wrk's Lua: cycle through the bodies; at the end print one JSON line with the latency percentiles (microseconds).
LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local i = 0
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, ' ..
    '"p99_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def workers_ready(url: str) -> int:
    """How many of a server's processes report el_ready 1 in /metrics (each series labelled by worker when there
    are several). /readyz answers 200 once one is ready, and a worker still loading takes no connection: a
    measurement waits for all of them."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url}/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return 0
    return sum(1 for fam in text_string_to_metric_families(text) if fam.name == "el_ready"
               for sample in fam.samples if sample.value == 1.0)


def wait_workers_ready(url: str, workers: int, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while workers_ready(url) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{workers_ready(url)} of {workers} server processes ready after {timeout_s:.0f} s")
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    """utime + stime of a process and of its running children (a server's worker processes, EL_WORKERS), in s."""
    def own(stat: list[str]) -> int:
        return int(stat[11]) + int(stat[12])

    ticks = own(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split())
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(pid):
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[1] == str(pid):
                ticks += own(stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def lua_script(mentions: Sequence[Mention], top_k: int) -> str:
    bodies = [json.dumps({"mention": m.mention, "context": m.context, "top_k": top_k}) for m in mentions]
    bodies = [b for b in bodies if "]==]" not in b]  # cannot sit in a Lua long string (none in practice)
    return "bodies = {\n" + ",\n".join(f"[==[{b}]==]" for b in bodies) + "\n}\n" + LUA


class Server:
    """`python -m service serve` on a free loopback port, with the parent's settings and its own job store."""

    def __init__(self, env_overrides: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.work = Path(tempfile.mkdtemp(prefix="el-bench-http-"))
        env = {k: v for k, v in os.environ.items() if k != "EL_RERANK__SKIP_MARGIN"}  # always OT, as served_b1
        # One process unless asked (EL_WORKERS): the scripts that compare two servers measure one process each.
        env = {**env, "EL_HOST": "127.0.0.1", "EL_PORT": str(self.port), "EL_JOBS__DIR": str(self.work / "jobs"),
               "EL_LOG_LEVEL": "WARNING", "EL_WORKERS": "1", **(env_overrides or {})}
        self.log = (self.work / "server.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.work / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S:.0f} s; log: {self.work / 'server.log'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


def top1_over_http(url: str, mentions: Sequence[Mention], top_k: int) -> list[str | None]:
    import httpx

    out = []
    with httpx.Client(base_url=url, timeout=60.0) as c:
        for m in mentions:
            r = c.post("/v1/link", json={"mention": m.mention, "context": m.context, "top_k": top_k})
            r.raise_for_status()
            ents = r.json()["entities"]
            out.append(ents[0]["id"] if ents else None)
    return out


def run_wrk(url: str, script: Path, concurrency: int, seconds: float) -> dict:
    cmd = [wrk_path() or "wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{seconds:g}s",
           "--timeout", "30s", "-s", str(script), f"{url}/v1/link"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH_JSON "))
    return json.loads(line.removeprefix("BENCH_JSON "))


def server_env(settings: Settings, source_mismatch: bool) -> dict[str, str]:
    """The settings that pick the bench's Linker (index, encoders, data), for the server to serve the same one."""
    env = {"EL_DATA_DIR": str(settings.data_dir), "EL_INDEX__DIR": str(settings.index.dir),
           "EL_INDEX__KG": settings.index.kg, "EL_ENCODER__ONNX_DIR": str(settings.encoder.onnx_dir)}
    if source_mismatch:
        env["EL_INDEX__ALLOW_SOURCE_MISMATCH"] = "true"
    return env


@dataclass
class Paired:
    """Alternating rounds of the in-process batched rate and the HTTP rate at one concurrency (`paired_share`)."""

    in_process: Callable[[], float]  # runs the in-process arm once: its mentions/s
    what: str  # what the in-process arm is
    rounds: int = 3
    seconds: float = 8.0


def paired_share(server: Server, script: Path, concurrency: int, paired: Paired) -> dict:
    """The HTTP share of the in-process rate, measured in turns: in process, then wrk, `rounds` times, so that
    the machine's other load (a shared VM's neighbours swing a lone 10 s run by a fifth) reaches both arms alike.
    Reported per round and as the median of the rounds' shares."""
    rounds = []
    for _ in range(paired.rounds):
        in_process = paired.in_process()
        res = run_wrk(server.url, script, concurrency, paired.seconds)
        http = res["requests"] / (res["duration_us"] / 1e6) if res["duration_us"] else 0.0
        rounds.append({"in_process_mentions_per_s": round(in_process, 1), "http_requests_per_s": round(http, 1),
                       "errors": sum(res["errors"].values()), "share": round(http / in_process, 3)})
    return {"concurrency": concurrency, "in_process": paired.what, "seconds": paired.seconds, "rounds": rounds,
            "median_share": round(statistics.median(r["share"] for r in rounds), 3)}


def http_rows(mentions: Sequence[Mention], env: dict[str, str], *, concurrencies: Sequence[int] = (1, 8, 32),
              seconds: float = 10.0, top_k: int = 10, h1: float | None = None,
              expected_top1: Sequence[str | None] = (), check_n: int = 20,
              paired: Paired | None = None, workers: int = 1) -> tuple[list[Row], dict | None]:
    """One row per concurrency, and with `paired` the alternating share at the highest concurrency
    (`paired_share`). `h1` is the in-process served rows' H@1; expected_top1 their top-1 ids, of which the first
    check_n are compared with what the server answers. `workers` > 1: the server runs that many processes
    (EL_WORKERS; rows `served_http_w<N>_c<C>`)."""
    env = {**env, "EL_WORKERS": str(workers)}  # always named: the default (auto) depends on the machine
    name = "served_http" if workers == 1 else f"served_http_w{workers}"
    server = Server(env)
    try:
        server.wait_ready()
        wait_workers_ready(server.url, workers)
        extra: dict = {}
        if expected_top1:
            got = top1_over_http(server.url, mentions[:check_n], top_k)
            extra["top1_agreement_with_in_process"] = round(
                sum(a == b for a, b in zip(got, expected_top1)) / max(len(got), 1), 3)
        script = server.work / "bench.lua"
        script.write_text(lua_script(mentions, top_k))
        run_wrk(server.url, script, 1, min(2.0, seconds))  # warm-up: first requests pay lazy start-up costs
        rows = []
        for c in concurrencies:
            cpu0 = _cpu_s(server.proc.pid)
            res = run_wrk(server.url, script, c, seconds)
            cpu = _cpu_s(server.proc.pid) - cpu0
            n = res["requests"]
            dur_s = res["duration_us"] / 1e6
            errors = sum(res["errors"].values())
            rows.append(Row(
                f"{name}_c{c}", f"HTTP POST /v1/link (text), wrk at concurrency {c} for {seconds:g} s on loopback "
                f"(wrk shares the machine){f', {workers} server processes' if workers > 1 else ''}", n, round(n / dur_s, 1) if dur_s else None, round(res["p50_us"] / 1000, 2),
                round(res["p95_us"] / 1000, 2), round(res["p99_us"] / 1000, 2), round(cpu / max(n, 1), 5), h1=h1,
                batch=1, h1_n=len(mentions), extra={"concurrency": c, "errors": errors, "error_kinds": res["errors"],
                                "h1_from": "served_b1 (the same Linker, in process)", **extra}))
        share = paired_share(server, script, max(concurrencies), paired) if paired is not None else None
        if share is not None:
            share["workers"] = workers
        return rows, share
    finally:
        server.stop()
