"""The text-only mention graph (student_mention.textonly.onnx: no image inputs, the blank image folded in) against
the full graph fed all-zero image inputs, in the served pipeline, in process.

    python scripts/bench_text_only.py [--n 1024] [--batch 64 1] [--rounds 4] [--out reports/bench-text-only.json]

The served Linker on the first --n WikiMEL test mentions (text only, as most requests are), adaptive rerank
(EL_RERANK__SKIP_MARGIN, 0.01 when unset), one caller, for each --batch: the two graphs alternating within each
round (the same Linker; only the encoder's graph for runs with no image changes): mentions/s, the median over
rounds, the ratio text-only / full, and whether every answer (top-1 and its score) agreed.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("reports/bench-text-only.json"))
    args = ap.parse_args()
    machine = machine_info()
    settings = Settings()
    base = Linker.from_settings(settings)
    base.warm_up()
    runtime = base.runtime
    if "mention" not in runtime.text_only_sessions:
        raise SystemExit("the export has no text-only mention graph")
    graphs = {"text_only": dict(runtime.text_only_sessions), "full": {}}
    margin = settings.rerank.skip_margin if settings.rerank.skip_margin is not None else 0.01
    linker = base.with_skip_margin(margin)
    mentions = read_mentions(settings.data_dir, "wikimel", "test")[: args.n]
    queries = [LinkQuery(m.mention, m.context, None, top_k=10) for m in mentions]
    report: dict = {"machine": machine, "n": len(queries), "rounds": args.rounds, "skip_margin": margin, "batches": {}}
    try:
        for batch in args.batch:
            chunks = [queries[i : i + batch] for i in range(0, len(queries), batch)]
            rate: dict[str, list[float]] = {g: [] for g in graphs}
            answers: dict[str, list] = {}
            for r in range(args.rounds):
                for graph in graphs if r % 2 == 0 else reversed(graphs):
                    runtime.text_only_sessions.clear()
                    runtime.text_only_sessions.update(graphs[graph])
                    linker.link_batch(chunks[0])
                    t = time.perf_counter()
                    got = [(x.entities[0].id, x.entities[0].score) if x.entities else None
                           for ch in chunks for x in linker.link_batch(ch).results]
                    rate[graph].append(len(queries) / (time.perf_counter() - t))
                    answers[graph] = got
            med = {g: statistics.median(rate[g]) for g in graphs}
            report["batches"][str(batch)] = {
                **{f"{g}_mentions_per_s": round(med[g], 1) for g in graphs},
                "rounds_mentions_per_s": {g: [round(x, 1) for x in rate[g]] for g in graphs},
                "ratio_text_only_to_full": round(med["text_only"] / med["full"], 3),
                "round_ratios": [round(a / b, 3) for a, b in zip(rate["text_only"], rate["full"])],
                "answers_agree": answers["text_only"] == answers["full"],
            }
    finally:
        runtime.text_only_sessions.update(graphs["text_only"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["batches"], indent=1))


if __name__ == "__main__":
    main()
