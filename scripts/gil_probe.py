"""How much a background thread's decoding slows /v1/link-style calls in the same process (the GIL).

    python scripts/gil_probe.py [--requests 200] [--out reports/gil-probe.json]

Two client threads call `Linker.link_batch` with one WikiMEL test mention each, back to back, while one more
thread (at nice 10, as the update threads run) repeats one kind of work: nothing; base64-decoding 8 of the WikiMEL
release's photos in one call each (`base64.b64decode`, as the service did) or as the service does now
(`base64_image_bytes`: pieces, giving up the GIL between them); parsing a 32-photo `POST /v1/entities:batch` body
item by item with and without giving up the GIL between items. Each kind runs twice, in turns. Reports link p50/p99
per kind. The link pipeline spends most of its time in native code (ONNX Runtime, torch, FAISS) and comes back to
Python dozens of times a request; each time it must retake the GIL, and a thread that holds it in long native calls
(or never lets go) makes it wait up to Python's 5 ms switch interval.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from kg_index.readers import read_mentions
    from service import entity_decode as entities
    from service.offline.bench import machine_info
    from service.pipeline.decode import base64_image_bytes
    from service.pipeline.linker import Linker
    from service.pipeline.types import LinkQuery
    from service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "gil-probe.json")
    args = ap.parse_args()

    settings = Settings()
    linker = Linker.from_settings(settings)
    linker.warm_up()
    mentions = read_mentions(settings.data_dir, "wikimel", "test")[: args.requests]
    photos = [base64.b64encode(p.read_bytes()).decode()
              for p in sorted((settings.data_dir / "WikiMEL" / "images").glob("*.jpg"))]
    body = json.dumps([{"id": f"x{i}", "name": "n", "description": "d", "image": photos[i % len(photos)]}
                       for i in range(32)]).encode()
    cap = settings.limits.max_image_bytes

    class NoYield:  # entities.time without the yields: the parser as it was
        @staticmethod
        def sleep(_: float) -> None:
            pass

    def parse_without_yields() -> None:
        real, entities.time = entities.time, NoYield  # type: ignore[assignment]
        try:
            entities.parse_batch(body, "application/json", 1000)
        finally:
            entities.time = real

    work = {
        "none": None,
        "b64_one_call": lambda: [base64.b64decode(p, validate=True) for p in photos[:8]],
        "b64_pieces": lambda: [base64_image_bytes(p, max_bytes=cap) for p in photos[:8]],
        "parse_without_yields": parse_without_yields,
        "parse_with_yields": lambda: entities.parse_batch(body, "application/json", 1000),
    }

    def background(fn, stop: threading.Event) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + 10)
        while not stop.is_set():
            fn()

    def client(share: list, out: list[float]) -> None:
        for m in share:
            t = time.perf_counter()
            linker.link_batch([LinkQuery(m.mention, m.context, None, top_k=10)])
            out.append((time.perf_counter() - t) * 1000)

    runs: dict[str, list[dict]] = {k: [] for k in work}
    for _ in range(2):
        for kind, fn in work.items():
            stop = threading.Event()
            bg = threading.Thread(target=background, args=(fn, stop)) if fn else None
            if bg:
                bg.start()
                time.sleep(0.3)
            out: list[float] = []
            clients = [threading.Thread(target=client, args=(mentions[i::2], out)) for i in range(2)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            stop.set()
            if bg:
                bg.join()
            a = np.asarray(out)
            runs[kind].append({"p50_ms": round(float(np.percentile(a, 50)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1)})
            print(f"{kind:22s} link p50 {runs[kind][-1]['p50_ms']:7.1f} ms  p99 {runs[kind][-1]['p99_ms']:7.1f} ms", flush=True)
    report = {"machine": machine_info(), "requests": len(mentions), "clients": 2, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
