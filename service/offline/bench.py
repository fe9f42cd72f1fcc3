"""Latency and throughput of the in-process pipeline (the same Linker the service runs).

Single-request latency for text only and text + image, and batched throughput; results go to
reports/bench.json with the machine they ran on.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from PIL import Image

from kg_index.readers import read_mentions
from service.pipeline.linker import Linker
from service.pipeline.types import LinkQuery


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it ("unknown" where /proc/cpuinfo has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(providers: list[str] | None = None) -> dict:
    """What a figure was measured on: timings only compare within one machine (and one run)."""
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu_model(), "arch": platform.machine(),
            "cpus": os.cpu_count(), "avx512": " avx512f" in flags}
    if providers is not None:
        info["providers"] = providers
    return info


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def _latency(linker: Linker, queries: list[LinkQuery]) -> dict[str, float]:
    for q in queries[:5]:  # warm caches
        linker.link(q)
    ms = []
    for q in queries:
        t = time.perf_counter()
        linker.link(q)
        ms.append((time.perf_counter() - t) * 1000)
    return {"n": len(ms), "p50_ms": _pct(ms, 0.5), "p95_ms": _pct(ms, 0.95), "p99_ms": _pct(ms, 0.99),
            "mean_ms": round(statistics.fmean(ms), 2)}


def run_bench(linker: Linker, data_dir: Path, *, n: int = 200, batch: int = 64, image_path: Path | None = None) -> dict:
    mentions = read_mentions(data_dir, "wikimel", "test")[: max(n, batch * 4)]
    image = None
    if image_path is None:
        candidates = sorted((data_dir / "WikiMEL" / "images").glob("*.jpg"))
        image_path = candidates[0] if candidates else None
    if image_path is not None:
        with Image.open(image_path) as im:
            im.draft("RGB", (224, 224))
            image = im.convert("RGB")
    else:
        image = Image.new("RGB", (640, 480), (120, 80, 40))
    text = [LinkQuery(m.mention, m.context, None, top_k=10) for m in mentions[:n]]
    with_image = [LinkQuery(m.mention, m.context, image, top_k=10) for m in mentions[:n]]
    report = {
        "machine": machine_info(linker.runtime.providers),
        "index": {"version": linker.index.version, "entities": len(linker.index),
                  "faiss": linker.index.manifest.faiss_factory},
        "single_text": _latency(linker, text),
        "single_text_image": _latency(linker, with_image),
    }
    all_q = [LinkQuery(m.mention, m.context, None, top_k=10) for m in mentions]
    t = time.perf_counter()
    for i in range(0, len(all_q), batch):
        linker.link_batch(all_q[i : i + batch])
    dt = time.perf_counter() - t
    report["batched_text"] = {"batch": batch, "mentions": len(all_q), "mentions_per_s": round(len(all_q) / dt, 1)}
    return report


def write_bench(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
