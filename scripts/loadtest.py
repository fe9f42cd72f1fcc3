#!/usr/bin/env python3
"""Bounded load test of a local entity-linking server (reliability A4).

    python scripts/loadtest.py                      # http://127.0.0.1:8000, 60 s at twice the capacity
    python scripts/loadtest.py --hold-s 5 --json    # the short version the test suite runs

1. capacity: closed loop, `--concurrency` clients back to back for `--probe-s` seconds -> served/s;
2. overload: open loop, requests arrive at `--factor` x capacity for `--hold-s` seconds, whatever the
   answers; counts answers by status and error kind;
3. recovery: from the moment the overload stops (its queued requests still being answered), one request
   at a time until `--recovery-ok` in a row are 200 (at most `--recovery-max-s`); reports the time from the
   end of the overload to the answer of the first of them;
4. capacity again, as in 1: if it differs much from the first, something else was using the machine.

Goals (A4): served during the overload >= 90 % of capacity, only 429/503 errors, 200 again within 5 s.
`--check` makes the exit status say whether they were met.

Safety: only http://127.0.0.1 is accepted as a target, every phase has a time limit, the whole run
stops by itself, and the number of requests is capped (`--max-requests`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

ALLOWED_HOSTS = {"127.0.0.1"}
MENTIONS = [
    ("Douglas Adams", "Douglas Adams wrote The Hitchhiker's Guide to the Galaxy."),
    ("Abraham Lincoln", "Abraham Lincoln gave the Gettysburg Address in 1863."),
    ("Berlin", "Berlin is the capital of Germany."),
    ("Plato", "Plato founded the Academy in Athens."),
    ("Paris", "Paris hosted the 1900 Summer Olympics."),
    ("Einstein", "Einstein published the theory of general relativity."),
]


@dataclass
class Report:
    url: str
    capacity_rps: float = 0.0
    capacity_after_rps: float = 0.0  # measured again at the end: a check on background load
    offered_rps: float = 0.0
    hold_s: float = 0.0
    sent: int = 0
    served: int = 0
    served_rps: float = 0.0
    served_fraction: float = 0.0  # served_rps / capacity_rps (capacity measured before the overload)
    # served_rps / the lower of the capacities measured before and after: on a machine whose background load
    # changes during the run, the capacity on both sides of the overload bounds what it could serve.
    served_fraction_bracketed: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    served_latency_ms: dict[str, float] = field(default_factory=dict)
    refused_latency_ms: dict[str, float] = field(default_factory=dict)
    recovery_s: float | None = None
    total_requests: int = 0
    goals: dict[str, bool] = field(default_factory=dict)


class Budget:
    """The hard cap on requests for the whole run."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def check_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ALLOWED_HOSTS or parts.path not in ("", "/"):
        raise SystemExit(f"refusing to load-test {url!r}: only http://127.0.0.1[:port] is allowed")
    return parts.hostname, parts.port or 80


class _Closed(Exception):
    """The server closed the connection before answering."""


class Client:
    """A minimal HTTP/1.1 keep-alive client (asyncio streams, requests pre-encoded): it needs a fraction of
    the CPU a full client would take from the server sharing this machine."""

    def __init__(self, host: str, port: int, max_connections: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(max_connections)

    def encode(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(data)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        return head.encode() + b"\r\n" + data

    async def send(self, raw: bytes) -> tuple[str, float]:
        """(outcome, seconds): the status code, or the error's class name (timeouts included); never raises."""
        async with self._slots:
            t0 = time.perf_counter()
            while True:
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else None
                try:
                    if conn is None:
                        conn = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout_s)
                    status, keep = await asyncio.wait_for(self._exchange(conn, raw), self.timeout_s)
                except _Closed:
                    conn[1].close()  # type: ignore[index]
                    if reused:  # the server closed an idle keep-alive connection: try a fresh one
                        continue
                    return "ServerDisconnected", time.perf_counter() - t0
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    if conn is not None:
                        conn[1].close()
                    return type(exc).__name__, time.perf_counter() - t0
                if keep:
                    self._idle.append(conn)
                else:
                    conn[1].close()
                return str(status), time.perf_counter() - t0

    @staticmethod
    async def _exchange(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], raw: bytes) -> tuple[int, bool]:
        reader, writer = conn
        writer.write(raw)
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise _Closed
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError("malformed status line")
        length, keep = 0, True
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        await reader.readexactly(length)
        return int(parts[1]), keep

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()




def requests(client: Client) -> itertools.cycle:
    return itertools.cycle([client.encode("POST", "/v1/link", {"mention": m, "context": c, "top_k": 5})
                            for m, c in MENTIONS])


async def measure_capacity(client: Client, concurrency: int, probe_s: float, budget: Budget) -> float:
    payload = requests(client)
    served = 0
    end = time.monotonic() + probe_s

    async def worker() -> None:
        nonlocal served
        while time.monotonic() < end and budget.take():
            outcome, _ = await client.send(next(payload))
            served += outcome == "200"

    await client.send(next(payload))  # warm the connection pool
    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return served / max(time.monotonic() - start, 1e-9)


async def overload(client: Client, rate: float, hold_s: float, budget: Budget, report: Report,
                   after: Callable[[], Awaitable[float | None]]) -> None:
    """Open-loop arrivals at `rate` for `hold_s`; `after` (the recovery probe) starts as soon as the arrivals
    stop, while the requests still queued are being answered."""
    payload = requests(client)
    outcomes: list[tuple[str, float, float]] = []  # (outcome, seconds, answered at)
    tasks: list[asyncio.Task] = []
    start = time.monotonic()
    for i in itertools.count():
        due = start + i / rate
        if due >= start + hold_s or not budget.take():
            break
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        task = asyncio.create_task(client.send(next(payload)))
        task.add_done_callback(lambda t: outcomes.append((*t.result(), time.monotonic())))
        tasks.append(task)
    elapsed = time.monotonic() - start
    _, report.recovery_s = await asyncio.gather(asyncio.gather(*tasks), after())
    report.hold_s = round(elapsed, 2)
    report.sent = len(tasks)
    report.offered_rps = round(len(tasks) / elapsed, 2)
    counts = Counter(o for o, _, _ in outcomes)
    report.statuses = {k: v for k, v in sorted(counts.items()) if k.isdigit()}
    report.errors = {k: v for k, v in sorted(counts.items()) if k != "200"}
    # Served *during* the overload: what was still queued when it stopped does not count.
    report.served = sum(o == "200" and at <= start + elapsed for o, _, at in outcomes)
    report.served_rps = round(report.served / elapsed, 2)
    report.served_latency_ms = quantiles([s for o, s, _ in outcomes if o == "200"])
    report.refused_latency_ms = quantiles([s for o, s, _ in outcomes if o in ("429", "503")])


async def recovery(client: Client, need_ok: int, max_s: float, budget: Budget) -> float | None:
    payload = requests(client)
    start = time.monotonic()
    streak, first_ok = 0, None
    while time.monotonic() - start < max_s and budget.take():
        outcome, _ = await client.send(next(payload))
        if outcome == "200":
            first_ok = time.monotonic() if streak == 0 else first_ok  # answered, not merely accepted
            streak += 1
            if streak >= need_ok:
                return round(first_ok - start, 2)
        else:
            streak = 0
            await asyncio.sleep(0.05)
    return None


def quantiles(xs: list[float]) -> dict[str, float]:
    if len(xs) < 2:
        return {"p50": round(xs[0] * 1000, 1)} if xs else {}
    q = statistics.quantiles(xs, n=100)
    return {"p50": round(q[49] * 1000, 1), "p90": round(q[89] * 1000, 1), "p99": round(q[98] * 1000, 1)}


async def run(args: argparse.Namespace) -> Report:
    host, port = check_target(args.url)
    report = Report(url=args.url)
    budget = Budget(args.max_requests)
    client = Client(host, port, args.max_connections, args.timeout_s)
    try:
        ready, _ = await client.send(client.encode("GET", "/readyz"))
        if ready != "200":
            raise SystemExit(f"{args.url}/readyz answered {ready}: the server is not ready")
        report.capacity_rps = round(await measure_capacity(client, args.concurrency, args.probe_s, budget), 2)
        if report.capacity_rps <= 0:
            raise SystemExit("no request was served while measuring capacity")
        await overload(client, args.factor * report.capacity_rps, args.hold_s, budget, report,
                       lambda: recovery(client, args.recovery_ok, args.recovery_max_s, budget))
        report.capacity_after_rps = round(await measure_capacity(client, args.concurrency, args.probe_s, budget), 2)
    finally:
        client.close()
    report.served_fraction = round(report.served_rps / report.capacity_rps, 3)
    floor = min(report.capacity_rps, report.capacity_after_rps or report.capacity_rps)
    report.served_fraction_bracketed = round(report.served_rps / floor, 3)
    report.total_requests = args.max_requests - budget.left
    report.goals = {
        "served_at_least_90pct_of_capacity": report.served_fraction >= 0.9,
        "only_429_503_errors": set(report.errors) <= {"429", "503"},
        "recovered_within_5s": report.recovery_s is not None and report.recovery_s <= 5.0,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (127.0.0.1 only)")
    p.add_argument("--probe-s", type=float, default=5.0, help="capacity measurement, seconds")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop clients while measuring capacity")
    p.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of capacity")
    p.add_argument("--hold-s", type=float, default=60.0, help="overload duration, seconds (at most 600)")
    p.add_argument("--recovery-ok", type=int, default=5, help="200s in a row that count as recovered")
    p.add_argument("--recovery-max-s", type=float, default=15.0, help="give up on recovery after this long")
    p.add_argument("--timeout-s", type=float, default=35.0, help="per-request client timeout")
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--max-requests", type=int, default=200_000, help="hard cap on requests for the whole run")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--check", action="store_true", help="exit 1 unless every A4 goal was met")
    args = p.parse_args(argv)
    check_target(args.url)
    if not (0 < args.hold_s <= 600 and 0 < args.probe_s <= 120 and args.factor > 0):
        raise SystemExit("--hold-s must be in (0, 600], --probe-s in (0, 120], --factor > 0")
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        for key, value in asdict(report).items():
            print(f"{key:>20}: {value}")
    return 0 if not args.check or all(report.goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
