"""The fast lane of POST /v1/link (service/fast_lane.py) against the route, over real HTTP.

    python scripts/bench_fast_lane.py [--rounds 8] [--seconds 8] [--concurrency 32] [--out reports/bench-fast-lane.json]

Two servers on loopback over the same index (`python -m service serve`: one with EL_LINK_FAST_LANE=false), driven
in turns by wrk with single text /v1/link requests (the first 2,000 WikiMEL test mentions, as `el bench`), round
after round, so that the machine's other load reaches both alike. Per round and arm: requests/s, errors, the
server's CPU ms per request (all threads) and its event-loop thread's; reported as the medians and the median of
the rounds' requests/s ratios (lane / route).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

ARMS = {"lane": {}, "route": {"EL_LINK_FAST_LANE": "false"}}


def _thread_cpu_s(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    from kg_index.readers import read_mentions
    from service.offline.bench import machine_info
    from service.offline.bench_http import Server, _cpu_s, lua_script, run_wrk, wrk_path
    from service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("reports/bench-fast-lane.json"))
    args = ap.parse_args()
    if wrk_path() is None:
        raise SystemExit("needs wrk (Debian: apt-get install wrk)")
    machine = machine_info()
    mentions = read_mentions(Settings().data_dir, "wikimel", "test")[:2000]
    servers = {arm: Server(env) for arm, env in ARMS.items()}
    rounds: list[dict] = []
    try:
        for s in servers.values():
            s.wait_ready()
        script = next(iter(servers.values())).work / "bench.lua"
        script.write_text(lua_script(mentions, 10))
        for s in servers.values():
            run_wrk(s.url, script, args.concurrency, 3.0)  # warm-up
        for _ in range(args.rounds):
            row = {}
            for arm, s in servers.items():
                pid = s.proc.pid
                cpu0, loop0 = _cpu_s(pid), _thread_cpu_s(pid, pid)  # uvicorn's event loop runs in the main thread
                res = run_wrk(s.url, script, args.concurrency, args.seconds)
                n = max(res["requests"], 1)
                row[arm] = {"requests_per_s": round(res["requests"] / (res["duration_us"] / 1e6), 1),
                            "errors": sum(res["errors"].values()),
                            "cpu_ms_per_request": round((_cpu_s(pid) - cpu0) * 1000 / n, 3),
                            "loop_cpu_ms_per_request": round((_thread_cpu_s(pid, pid) - loop0) * 1000 / n, 3)}
            row["ratio"] = round(row["lane"]["requests_per_s"] / row["route"]["requests_per_s"], 3)
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    summary = {arm: {k: round(statistics.median(r[arm][k] for r in rounds), 3)
                     for k in ("requests_per_s", "cpu_ms_per_request", "loop_cpu_ms_per_request")}
               for arm in ARMS}
    report = {"machine": machine, "concurrency": args.concurrency, "seconds": args.seconds,
              "requests": "single text POST /v1/link (JSON), the first 2,000 WikiMEL test mentions, top_k 10",
              "arms": {"lane": "default (EL_LINK_FAST_LANE=true)", "route": "EL_LINK_FAST_LANE=false"},
              "rounds": rounds, "median": summary,
              "median_ratio": statistics.median(r["ratio"] for r in rounds),
              "rounds_lane_faster": sum(r["ratio"] > 1 for r in rounds),
              "errors": sum(r[a]["errors"] for r in rounds for a in ARMS)}
    report["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("median", "median_ratio", "rounds_lane_faster", "errors")}, indent=1))


if __name__ == "__main__":
    main()
