"""What explain=true costs: /v1/link's pipeline (the Linker, in process, one mention per call as the web page sends
them) with and without the alignment pictures, on the first N mentions of a split, with the index and encoders of
the EL_ settings.

    python scripts/bench_explain.py [--n 100] [--dataset wikimel] [--split test] [--rounds 3] [--image PATH]

Rounds alternate (off, on, off, on, ...) and each mention keeps its minimum over the rounds, so other load on a
shared machine hits both sides alike. Prints one JSON object: p50 / mean ms per call each way, their ratio, and the
size of the explained answer's `explain` field in JSON. --image sends that image with every mention (the visual
plans too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--dataset", default="wikimel")
    p.add_argument("--split", default="test")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image", type=Path, help="an image sent with every mention")
    args = p.parse_args()

    from PIL import Image

    from kg_index.readers import read_mentions
    from service.offline.bench import machine_info
    from service.pipeline.linker import Linker
    from service.pipeline.types import LinkQuery
    from service.settings import Settings

    settings = Settings()
    linker = Linker.from_settings(settings)
    linker.warm_up()
    image = Image.open(args.image).convert("RGB") if args.image else None
    mentions = read_mentions(settings.data_dir, args.dataset, args.split)[: args.n]
    best = {False: [float("inf")] * len(mentions), True: [float("inf")] * len(mentions)}
    sizes: list[int] = []
    for rnd in range(args.rounds):
        for i, m in enumerate(mentions):
            for explain in ((False, True) if (rnd + i) % 2 == 0 else (True, False)):  # alternate which goes first
                q = LinkQuery(m.mention, m.context, image, top_k=10, explain=explain)
                t = time.perf_counter()
                r = linker.link(q)
                best[explain][i] = min(best[explain][i], (time.perf_counter() - t) * 1000)
                if explain and len(sizes) < len(mentions):
                    sizes.append(len(json.dumps([asdict(a) for a in r.explain])))
    off, on = best[False], best[True]
    report = {
        "mentions": len(mentions), "rounds": args.rounds, "image": bool(image),
        "off_ms": {"p50": round(statistics.median(off), 2), "mean": round(statistics.fmean(off), 2)},
        "on_ms": {"p50": round(statistics.median(on), 2), "mean": round(statistics.fmean(on), 2)},
        "on_over_off_p50": round(statistics.median(on) / statistics.median(off), 3),
        "on_over_off_mean": round(statistics.fmean(on) / statistics.fmean(off), 3),
        "explain_json_bytes": {"p50": int(statistics.median(sizes)), "max": max(sizes)},
        "machine": machine_info(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
