"""The student encoders with and without length bands (models/runtime.py `length_buckets`), per item.

    python scripts/bench_length_bands.py [--threads 1] [--batch 64] [--repeats 3] [--out reports/bench-length-bands.json]

Mentions: the first 1,024 WikiMEL test mentions (`mention [SEP] sentence`); entities: 512 KG entities spread over
the index (`name [SEP] description`), as the update worker and the index build encode them. "one run" pads each
batch to its longest row (what the runtime did before); "bands" is the shipped runtime. Each figure is the fastest
of --repeats passes, the two modes taking turns, so that other load on a shared machine reaches both alike. Also
checks that both give the same features (max absolute difference).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    import models.runtime as rt_mod
    from kg_index.readers import read_mentions
    from service.offline.bench import machine_info
    from service.pipeline.linker import Linker
    from service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench-length-bands.json")
    args = ap.parse_args()

    settings = Settings()
    entities = Linker.from_settings(settings).index.entities
    runtime = rt_mod.EncoderRuntime(settings.encoder.onnx_dir, device="cpu", threads=args.threads)
    mentions = read_mentions(settings.data_dir, "wikimel", "test")[:1024]
    picked = entities[:: max(1, len(entities) // 512)][:512]
    sets = {"mention": ([m.mention for m in mentions], [m.context for m in mentions]),
            "entity": ([e.name for e in picked], [e.description for e in picked])}
    bands = rt_mod.length_buckets

    def one_run(lengths: np.ndarray, **_: int) -> list[np.ndarray]:
        return [np.arange(len(lengths))]

    def encode(side: str, first: list[str], second: list[str], mode: str) -> tuple[float, list]:
        rt_mod.length_buckets = bands if mode == "bands" else one_run  # type: ignore[assignment]
        try:
            t = time.perf_counter()
            out = [runtime.encode_student(side, first[i:i + args.batch], second[i:i + args.batch],  # type: ignore[arg-type]
                                          [None] * len(first[i:i + args.batch])) for i in range(0, len(first), args.batch)]
            return time.perf_counter() - t, out
        finally:
            rt_mod.length_buckets = bands

    report: dict = {"machine": machine_info(), "threads": args.threads, "batch": args.batch, "sides": {}}
    for side, (first, second) in sets.items():
        lengths = runtime.tokenize(first, second)[1].sum(axis=1)
        encode(side, first[: args.batch], second[: args.batch], "bands")  # warm-up
        best = {"one run": float("inf"), "bands": float("inf")}
        outs: dict[str, list] = {}
        for _ in range(args.repeats):
            for mode in ("one run", "bands"):
                wall, outs[mode] = encode(side, first, second, mode)
                best[mode] = min(best[mode], wall)
        diff = max(float(np.abs(a.global_ - b.global_).max()) for a, b in zip(outs["one run"], outs["bands"]))
        per_item = {m: round(w / len(first) * 1000, 3) for m, w in best.items()}
        report["sides"][side] = {"items": len(first), "mean_tokens": round(float(lengths.mean()), 1),
                                 "ms_per_item": per_item, "speedup": round(per_item["one run"] / per_item["bands"], 2),
                                 "max_abs_diff_global": diff}
        print(f"{side}: {len(first)} items, mean {lengths.mean():.1f} tokens: one run {per_item['one run']} ms/item, "
              f"bands {per_item['bands']} ms/item ({report['sides'][side]['speedup']}x); max |diff| {diff:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
