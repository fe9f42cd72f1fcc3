"""A batch alone linked as two halves at once (EL_BATCHING__SPLIT_MIN, service/pipeline/halves.py) against the
whole batch on one caller's thread, in process.

    python scripts/bench_halves.py [--n 2048] [--batch 64] [--rounds 3] [--out reports/bench-halves.json]

The served Linker on the first --n WikiMEL test mentions (text) in batches of --batch, one caller, OT on every
mention and adaptive (EL_RERANK__SKIP_MARGIN 0.01), both modes alternating within each round: mentions/s and CPU
ms per mention (this process, every thread), the median over rounds, the ratio halves / whole, and whether every
top-1 agreed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    from kg_index.readers import read_mentions
    from service.offline.bench import machine_info
    from service.pipeline.linker import Linker
    from service.pipeline.types import LinkQuery
    from service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("reports/bench-halves.json"))
    args = ap.parse_args()
    machine = machine_info()
    settings = Settings()
    if not settings.batching.split_min:
        raise SystemExit("EL_BATCHING__SPLIT_MIN is 0: nothing to compare")
    base = Linker.from_settings(settings)
    base.warm_up()
    whole_settings = settings.model_copy(update={"batching": settings.batching.model_copy(update={"split_min": 0})})
    mentions = read_mentions(settings.data_dir, "wikimel", "test")[: args.n]
    queries = [LinkQuery(m.mention, m.context, None, top_k=10) for m in mentions]
    chunks = [queries[i : i + args.batch] for i in range(0, len(queries), args.batch)]
    report: dict = {"machine": machine, "n": len(queries), "batch": args.batch, "rounds": args.rounds,
                    "split_min": settings.batching.split_min, "modes": {}}
    for label, margin in (("ot_every_mention", None), ("adaptive_0.01", 0.01)):
        halves = base.with_skip_margin(margin)
        whole = copy.copy(halves)
        whole.settings = whole_settings
        arms = {"halves": halves, "whole": whole}
        rate: dict[str, list[float]] = {a: [] for a in arms}
        cpu: dict[str, list[float]] = {a: [] for a in arms}
        tops: dict[str, list[str | None]] = {}
        for linker in arms.values():
            linker.link_batch(chunks[0])
        for _ in range(args.rounds):
            for arm, linker in arms.items():
                t, c = time.perf_counter(), time.process_time()
                top = [r.entities[0].id if r.entities else None for ch in chunks for r in linker.link_batch(ch).results]
                rate[arm].append(len(queries) / (time.perf_counter() - t))
                cpu[arm].append((time.process_time() - c) * 1000 / len(queries))
                tops[arm] = top
        med = {a: statistics.median(rate[a]) for a in arms}
        report["modes"][label] = {
            **{f"{a}_mentions_per_s": round(med[a], 1) for a in arms},
            **{f"{a}_cpu_ms_per_mention": round(statistics.median(cpu[a]), 3) for a in arms},
            "rounds_mentions_per_s": {a: [round(x, 1) for x in rate[a]] for a in arms},
            "ratio_halves_to_whole": round(med["halves"] / med["whole"], 3),
            "top1_agree": tops["halves"] == tops["whole"],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["modes"], indent=1))


if __name__ == "__main__":
    main()
