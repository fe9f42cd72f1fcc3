"""The int8 shortlist of exact retrieval (EL_INDEX__INT8_SHORTLIST, kg_index/int8_scan.py) against the search
without it, from the kernel to HTTP.

    python scripts/bench_retrieval_int8.py [--rounds 4] [--seconds 8] [--workers 1 2]
                                           [--out reports/bench-retrieval-int8.json]

Three parts, on the served index and the trained student's mention vectors:
- exactness: every mention of WikiMEL test and the three dev splits searched through the int8 shortlist (forced on,
  batches of 8, then alone) and through the fp32 search: queries whose rows differ, the largest score difference,
  how many queries the bound sent back to fp32; and the int8 scores' largest error against the smallest bound;
- search: whole searches (k = 32, as the retrieve stage asks) of 1 to 64 WikiMEL test mention vectors through
  each kernel forced (fp32: the GEMM, or FAISS's one-thread scan for 1-2 queries; bf16: the shortlist, or the bf16
  scan; int8: the shortlist) and through the plan this index measured when it loaded (served; no spare core),
  alternating, a 64 MB read before each search (the pipeline's other stages evict the caches); the median ms per
  search of each;
- HTTP: two servers on loopback over the same index, one with EL_INDEX__INT8_SHORTLIST=off, driven in turns by
  wrk with single text /v1/link requests (the first 2,000 WikiMEL test mentions, as `el bench`) at concurrency 8
  and 32, --rounds rounds, for each --workers server size: requests/s, p50 / p99, errors, the server's CPU ms per
  request; the median ratio int8 / off per concurrency.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

SPLITS = (("wikimel", "test"), ("wikimel", "dev"), ("richpedia", "dev"), ("wikidiverse", "dev"))
BATCHES = (1, 2, 4, 8, 12, 16, 32, 64)
ARMS = {"int8": {}, "off": {"EL_INDEX__INT8_SHORTLIST": "off"}}


def main() -> None:
    from kg_index import exact
    from kg_index.int8_scan import int8_scores_error, int8_usable
    from service.offline.bench import machine_info
    from service.pipeline.linker import Linker
    from service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="HTTP rounds per server size")
    ap.add_argument("--seconds", type=float, default=8.0, help="wrk's run per arm, round and concurrency")
    ap.add_argument("--search-rounds", type=int, default=6)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server sizes (EL_WORKERS)")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("reports/bench-retrieval-int8.json"))
    args = ap.parse_args()
    if not int8_usable():
        raise SystemExit("FBGEMM's int8 products are not usable on this CPU or torch build: nothing to compare")
    machine = machine_info()
    settings = Settings()
    linker = Linker.from_settings(settings)
    search = linker.index.exact
    if search is None:
        raise SystemExit("the served index is not Flat: its search is FAISS's, the int8 shortlist does not apply")
    report: dict = {"machine": machine, "index_version": linker.index.version, "entities": len(search),
                    "int8_extra": exact.INT8_EXTRA, "plan": dataclasses.asdict(search.plan), "exactness": {}}

    served = (settings.index.bf16_shortlist, settings.index.int8_shortlist)
    wikimel_test = None
    try:
        for dataset, split in SPLITS:
            ms = read_split(settings, dataset, split)
            feats = linker.runtime.encode_student("mention", [m.mention for m in ms], [m.context for m in ms],
                                                  [None] * len(ms))
            q = np.ascontiguousarray(feats.global_, dtype=np.float32)
            wikimel_test = q if wikimel_test is None else wikimel_test
            entry: dict = {"queries": len(q)}
            for batch in (8, 1):
                before, used = search.fp32_researches, search.int8_shortlisted
                out = {}
                for mode, (coarse, int8) in {"fp32": ("off", "off"), "int8": ("off", "on")}.items():
                    exact.configure_coarse(coarse)
                    exact.configure_int8(int8)
                    parts = [search.search(q[i : i + batch], 32) for i in range(0, len(q), batch)]
                    out[mode] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
                entry[f"batch {batch}"] = {
                    "queries_with_other_rows": int((out["fp32"][1] != out["int8"][1]).any(1).sum()),
                    "same_top1": float((out["fp32"][1][:, 0] == out["int8"][1][:, 0]).mean()),
                    "max_score_difference": float(np.abs(out["fp32"][0] - out["int8"][0]).max()),
                    "int8_shortlisted": search.int8_shortlisted - used,
                    "fp32_researches": search.fp32_researches - before}
            errors = [int8_scores_error(search.vectors, q[i : i + 256]) for i in range(0, len(q), 256)]
            entry["int8_max_error"] = round(max(e for e, _ in errors), 5)
            entry["int8_min_bound"] = round(min(b for _, b in errors), 5)
            report["exactness"][f"{dataset} {split}"] = entry
            print(f"{dataset} {split}: {entry}", flush=True)
        report["search"] = search_speed(search, wikimel_test, args.search_rounds, served)
    finally:
        exact.configure_coarse(served[0])
        exact.configure_int8(served[1])
    if not args.skip_http:
        report["http"] = {f"workers {w}": http_ab(settings, w, args.rounds, args.seconds) for w in args.workers}
    report["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("search", "http") if k in report}, indent=1))


def read_split(settings, dataset: str, split: str):
    from kg_index.readers import read_mentions

    return read_mentions(settings.data_dir, dataset, split)


def search_speed(search, q: np.ndarray, rounds: int, served: tuple[str, str], per_round: int = 8) -> dict:
    """Median ms per whole search (k = 32) of each batch size through each kernel, alternating in rounds."""
    from kg_index import exact

    arms = {"fp32": ("off", "off"), "bf16": ("on", "off"), "int8": ("off", "on"), "served": served}
    plan = search.plan
    # 1-2 queries (no spare core here): fp32 is FAISS's one-thread scan, bf16 the bf16 scan, whatever the plan says
    small = {"fp32": "faiss", "bf16": "bf16", "int8": "int8", "served": plan.small_alone}
    evict = np.ones(16_000_000, np.float32)  # 64 MB: more than this CPU's caches hold
    times: dict[tuple[int, str], list[float]] = defaultdict(list)
    rng = np.random.default_rng(0)
    minimum = exact.COARSE_MIN_BATCH
    try:
        for _ in range(rounds):
            for b in BATCHES:
                for arm, (coarse, int8) in arms.items():
                    exact.configure_coarse(coarse)
                    exact.configure_int8(int8)
                    exact.COARSE_MIN_BATCH = 1 if arm == "bf16" else minimum  # forced: every size
                    search.plan = dataclasses.replace(plan, small_alone=small[arm])
                    ts = []
                    for _ in range(per_round):
                        rows = q[rng.choice(len(q), b, replace=False)]
                        evict.sum()
                        t0 = time.perf_counter()
                        search.search(rows, 32)
                        ts.append(time.perf_counter() - t0)
                    times[(b, arm)].append(float(np.median(ts)) * 1000)
    finally:
        exact.COARSE_MIN_BATCH = minimum
        search.plan = plan
    out = {}
    for b in BATCHES:
        ms = {arm: round(float(np.median(times[(b, arm)])), 2) for arm in arms}
        out[f"batch {b}"] = {"ms": ms, "int8_speedup_over_fp32": round(ms["fp32"] / ms["int8"], 2),
                             "int8_speedup_over_bf16": round(ms["bf16"] / ms["int8"], 2)}
        print(f"search batch {b}: {out[f'batch {b}']}", flush=True)
    return out


def http_ab(settings, workers: int, rounds: int, seconds: float) -> dict:
    """Alternating wrk runs against a server with the int8 shortlist (auto) and one without (off)."""
    from kg_index.readers import read_mentions
    from service.offline.bench_http import Server, _cpu_s, lua_script, run_wrk, wrk_path

    if wrk_path() is None:
        return {"skipped": "needs wrk (Debian: apt-get install wrk)"}
    mentions = read_mentions(settings.data_dir, "wikimel", "test")[:2000]
    servers = {arm: Server({**env, "EL_WORKERS": str(workers)}) for arm, env in ARMS.items()}
    runs: list[dict] = []
    try:
        for s in servers.values():
            s.wait_ready()
        script = next(iter(servers.values())).work / "bench.lua"
        script.write_text(lua_script(mentions, 10))
        for s in servers.values():
            run_wrk(s.url, script, 32, 3.0)  # warm-up
        for _ in range(rounds):
            for c in (8, 32):
                row: dict = {"concurrency": c}
                for arm, s in servers.items():
                    cpu0 = _cpu_s(s.proc.pid)
                    res = run_wrk(s.url, script, c, seconds)
                    n = max(res["requests"], 1)
                    row[arm] = {"requests_per_s": round(res["requests"] / (res["duration_us"] / 1e6), 1),
                                "p50_ms": round(res["p50_us"] / 1000, 2), "p99_ms": round(res["p99_us"] / 1000, 2),
                                "errors": sum(res["errors"].values()),
                                "cpu_ms_per_request": round((_cpu_s(s.proc.pid) - cpu0) * 1000 / n, 3)}
                row["ratio"] = round(row["int8"]["requests_per_s"] / row["off"]["requests_per_s"], 3)
                runs.append(row)
                print(f"workers {workers}: {json.dumps(row)}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    out: dict = {"rounds": runs}
    for c in (8, 32):
        rs = [r for r in runs if r["concurrency"] == c]
        out[f"c{c}"] = {"median_ratio": statistics.median(r["ratio"] for r in rs),
                        "rounds_int8_faster": sum(r["ratio"] > 1 for r in rs), "rounds": len(rs),
                        "median": {arm: {k: statistics.median(r[arm][k] for r in rs)
                                         for k in ("requests_per_s", "p50_ms", "p99_ms", "cpu_ms_per_request")}
                                   for arm in ARMS},
                        "errors": sum(r[a]["errors"] for r in rs for a in ARMS)}
    return out


if __name__ == "__main__":
    main()
