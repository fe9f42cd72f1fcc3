"""The bf16 shortlist of exact retrieval (EL_INDEX__BF16_SHORTLIST, kg_index/exact.py) against the fp32 search.

    python scripts/bench_retrieval_bf16.py [--n 1024] [--rounds 3] [--out reports/bench-retrieval-bf16.json]

Three parts, on the served index and the trained student's mention vectors:
- exactness: every mention of WikiMEL test and the three dev splits searched both ways (top 48, as the retrieve
  stage asks for 32 candidates): queries whose rows differ, the largest score difference, and how many queries the
  rounding bound sent back to fp32;
- the threshold (COARSE_MIN_BATCH): whole searches of WikiMEL test mention vectors in batches of 3 to 10 (and 16),
  fp32 against the shortlist, alternating for --search-rounds rounds, with a 64 MB read between searches (in the
  pipeline the other stages evict the caches in between); the median ms per batch of each;
- speed: the served pipeline in process (Linker.link_batch, text) on the first --n WikiMEL test mentions, batches
  of 6, 8 and 16 (/v1/link forms batches of 6-9 on average at concurrency 32, up to 32) and 64, both modes
  alternating for --rounds rounds; the retrieve stage's ms per mention and the pipeline's mentions/s, best round of
  each, as ratios auto / off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

SPLITS = (("wikimel", "test"), ("wikimel", "dev"), ("richpedia", "dev"), ("wikidiverse", "dev"))


def main() -> None:
    from kg_index import exact
    from kg_index.readers import read_mentions
    from service.offline.bench import machine_info
    from service.pipeline.linker import Linker
    from service.pipeline.types import LinkQuery
    from service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--search-rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("reports/bench-retrieval-bf16.json"))
    args = ap.parse_args()
    machine = machine_info()
    settings = Settings()
    linker = Linker.from_settings(settings)
    linker.warm_up()
    search = linker.index.exact
    if search is None:
        raise SystemExit("the served index is not Flat: its search is FAISS's, the bf16 shortlist does not apply")
    report: dict = {"machine": machine, "index_version": linker.index.version, "entities": len(search),
                    "cpu_has_bf16": exact.cpu_has_bf16(), "coarse_extra": exact.COARSE_EXTRA,
                    "coarse_min_batch": exact.COARSE_MIN_BATCH, "plan": dataclasses.asdict(search.plan),
                    "exactness": {}, "speed": {}}

    for dataset, split in SPLITS:
        ms = read_mentions(settings.data_dir, dataset, split)
        feats = linker.runtime.encode_student("mention", [m.mention for m in ms], [m.context for m in ms],
                                              [None] * len(ms))
        q = feats.global_.astype(np.float32)
        before = search.fp32_researches
        rows, scores = {}, {}
        for mode in ("off", "on"):
            exact.configure_coarse(mode)
            parts = [search.search(q[i : i + 64], 32) for i in range(0, len(q), 64)]
            scores[mode] = np.concatenate([p[0] for p in parts])
            rows[mode] = np.concatenate([p[1] for p in parts])
        report["exactness"][f"{dataset} {split}"] = {
            "queries": len(q), "queries_with_other_rows": int((rows["off"] != rows["on"]).any(1).sum()),
            "same_top1": float((rows["off"][:, 0] == rows["on"][:, 0]).mean()),
            "max_score_difference": float(np.abs(scores["off"] - scores["on"]).max()),
            "fp32_researches": search.fp32_researches - before}
        print(f"{dataset} {split}: {report['exactness'][f'{dataset} {split}']}", flush=True)

        if (dataset, split) == ("wikimel", "test"):
            report["threshold"] = threshold_speed(search, q, args.search_rounds)

    ms = read_mentions(settings.data_dir, "wikimel", "test")[: args.n]
    queries = [LinkQuery(m.mention, m.context, None, top_k=10) for m in ms]
    runs: dict[str, list[dict]] = defaultdict(list)
    for _ in range(args.rounds):
        for batch in (6, 8, 16, 64):
            for mode in ("off", "auto"):
                exact.configure_coarse(mode)
                stages: Counter = Counter()
                t0 = time.perf_counter()
                for i in range(0, len(queries), batch):
                    stages.update(linker.link_batch(queries[i : i + batch]).timings_ms)
                wall = time.perf_counter() - t0
                run = {"mentions_per_s": round(len(queries) / wall, 1),
                       "retrieve_ms_per_mention": round(stages["retrieve"] / len(queries), 3)}
                runs[f"b{batch} {mode}"].append(run)
                print(f"batch {batch} {mode}: {run}", flush=True)
    exact.configure_coarse(settings.index.bf16_shortlist)
    for batch in (6, 8, 16, 64):
        off, auto = runs[f"b{batch} off"], runs[f"b{batch} auto"]
        best = {m: (max(r["mentions_per_s"] for r in rs), min(r["retrieve_ms_per_mention"] for r in rs))
                for m, rs in (("off", off), ("auto", auto))}
        report["speed"][f"batch {batch}"] = {
            "runs": {"off": off, "auto": auto},
            "retrieve_speedup": round(best["off"][1] / best["auto"][1], 2),
            "pipeline_speedup": round(best["auto"][0] / best["off"][0], 2)}
    report["machine"]["load_avg_after"] = list(np.round(np.array(__import__("os").getloadavg()), 2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["speed"], indent=1))


def threshold_speed(search, q: np.ndarray, rounds: int, batches: tuple[int, ...] = (3, 4, 5, 6, 7, 8, 10, 16),
                    per_round: int = 8) -> dict:
    """ms per whole search (k = 32) of `batches` queries, fp32 against the shortlist (forced on below its threshold),
    alternating in rounds; median over the rounds of each round's median."""
    from kg_index import exact

    evict = np.ones(16_000_000, np.float32)  # 64 MB: more than this CPU's caches hold
    times: dict[tuple[int, str], list[float]] = defaultdict(list)
    rng = np.random.default_rng(0)
    threshold = exact.COARSE_MIN_BATCH
    try:
        for _ in range(rounds):
            for b in batches:
                for arm, mode, least in (("fp32", "off", threshold), ("shortlist", "on", 1)):
                    exact.configure_coarse(mode)
                    exact.COARSE_MIN_BATCH = least
                    ts = []
                    for _ in range(per_round):
                        rows = q[rng.choice(len(q), b, replace=False)]
                        evict.sum()
                        t0 = time.perf_counter()
                        search.search(rows, 32)
                        ts.append(time.perf_counter() - t0)
                    times[(b, arm)].append(float(np.median(ts)) * 1000)
    finally:
        exact.COARSE_MIN_BATCH = threshold
    out = {}
    for b in batches:
        fp32, short = np.median(times[(b, "fp32")]), np.median(times[(b, "shortlist")])
        out[f"batch {b}"] = {"fp32_ms": round(float(fp32), 2), "shortlist_ms": round(float(short), 2),
                             "speedup": round(float(fp32 / short), 2)}
        print(f"search batch {b}: {out[f'batch {b}']}", flush=True)
    return out


if __name__ == "__main__":
    main()
