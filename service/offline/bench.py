"""Benchmark building blocks: the machine a figure was measured on, one row's measurement, the ratios between
rows, and the report (reports/bench.json) and its chart (reports/bench.png).

The rows themselves live beside this module: bench_plain.py (sentence-transformers + FAISS Flat, what a user would
otherwise glue together), bench_http.py (a real server under wrk), bench_ot.py (our Sinkhorn against POT's) and
bench_run.py (the served Linker in process, the teacher's exhaustive scoring, and the order they run in).
Timings compare only within one run on one machine: every row carries ratios against the named baselines.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PLAIN = "plain_biencoder"  # the baselines every row is compared with
TEACHER = "teacher_exhaustive"
PLAIN_B1 = "plain_biencoder_b1"  # its single-request row: the baseline of single-request latency
# The served rows that answer one mention per call: in process, and over HTTP at concurrency 1 (one server process,
# or served_http_w<N>_c1 for N).
SINGLE_ROWS = re.compile(r"served_b1|served_http(_w\d+)?_c1")


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
    try:
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]  # the machine may be shared
    except OSError:
        pass
    if providers is not None:
        info["providers"] = providers
    return info


@dataclass
class Row:
    """One system measured on a set of mentions (or, for the OT rows, of OT problems)."""

    name: str
    what: str  # one line: what ran, on which inputs, at which batch or concurrency
    n: int  # mentions (or problems) timed
    mentions_per_s: float | None
    p50_ms: float | None  # latency of one call (a call handles `batch` mentions)
    p95_ms: float | None
    p99_ms: float | None
    cpu_s_per_mention: float | None  # process CPU time (all threads) per mention
    h1: float | None = None  # H@1 on the bench's mentions
    h1_subset: float | None = None  # H@1 on the teacher's subset (the first `teacher_n` of them)
    batch: int | None = None
    h1_n: int | None = None  # mentions the H@1 is over, when not `n` (HTTP rows count requests)
    extra: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass
class Timed:
    """Per-call latencies and the wall and CPU seconds of a loop of calls."""

    latencies_ms: list[float]
    wall_s: float
    cpu_s: float

    def row(self, name: str, what: str, n: int, **kwargs: Any) -> Row:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else None
        pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if lat is not None else (lambda q: None)
        return Row(name, what, n, round(n / self.wall_s, 1) if self.wall_s > 0 else None, pct(50), pct(95), pct(99),
                   round(self.cpu_s / max(n, 1), 5), **kwargs)


def time_calls(fn: Callable[[Any], Any], calls: Sequence[Any], warmup: int = 2) -> tuple[Timed, list[Any]]:
    """Run fn on each item of calls (after `warmup` untimed calls on the first items); return the timings and the
    outputs in order. CPU time is the whole process's (time.process_time), so it counts every thread."""
    for c in calls[:warmup]:
        fn(c)
    outs, lat = [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for c in calls:
        t = time.perf_counter()
        outs.append(fn(c))
        lat.append((time.perf_counter() - t) * 1000)
    return Timed(lat, time.perf_counter() - wall0, time.process_time() - cpu0), outs


def hits_at_1(predicted: Sequence[str | None], gold: Sequence[str]) -> float:
    return round(sum(p == g for p, g in zip(predicted, gold)) / max(len(gold), 1), 4)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _points(a: float | None, b: float | None) -> float | None:
    return round(100 * (a - b), 2) if a is not None and b is not None else None


def add_ratios(rows: list[Row]) -> None:
    """Each row's figures against the plain bi-encoder's and the exhaustive teacher's (where those rows ran):
    mentions/s and CPU-s/mention as ratios (row / baseline), H@1 as a difference in points (on the teacher's subset
    where the teacher is one of the two)."""
    by_name = {r.name: r for r in rows}
    for r in rows:
        if r.name.startswith("ot_"):  # OT rows count problems, not mentions: bench_ot compares them with each other
            continue
        r.ratios = {}
        for base_name in (PLAIN, TEACHER):
            base = by_name.get(base_name)
            if base is None or base is r:
                continue
            h1_of = "h1_subset" if TEACHER in (r.name, base_name) else "h1"  # the teacher ran on a subset only
            same_mentions = h1_of == "h1_subset" or (r.h1_n or r.n) == (base.h1_n or base.n)
            r.ratios[base_name] = {
                "mentions_per_s": _ratio(r.mentions_per_s, base.mentions_per_s),
                "cpu_s_per_mention": _ratio(r.cpu_s_per_mention, base.cpu_s_per_mention),
                "h1_points": _points(getattr(r, h1_of), getattr(base, h1_of)) if same_mentions else None,
            }


def single_request(rows: list[Row]) -> dict[str, Any]:
    """Single-request p50 of the served rows that answer one mention per call, against the plain bi-encoder's
    (one text encoded, one query searched: what a user's own glue answers one request with)."""
    by_name = {r.name: r for r in rows}
    base = by_name.get(PLAIN_B1)
    if base is None or not base.p50_ms:
        return {}
    return {"baseline": PLAIN_B1, "baseline_p50_ms": base.p50_ms,
            "p50_ratio": {r.name: _ratio(r.p50_ms, base.p50_ms) for r in rows if SINGLE_ROWS.fullmatch(r.name)}}


TEACHER_RATES = {"exhaustive": None, "top1_bounded": "top1_bounded_mentions_per_s",
                 "gold_bounded": "gold_bounded_mentions_per_s"}


def teacher_shortcuts(rows: list[Row]) -> dict[str, Any]:
    """The batched served rows' mentions/s against the teacher three ways, each with the KB encoded beforehand and
    the mentions' encoding counted: scoring every entity (the protocol: the teacher row's rate), the exact top
    entity found by bounds without labels (what a served teacher could do), and the gold's exact rank with the
    gold's score as the bound (needs the labels: the cheapest, a lower bound on any teacher's cost)."""
    teacher = {r.name: r for r in rows}.get(TEACHER)
    if teacher is None or not teacher.mentions_per_s:
        return {}
    extra = teacher.extra or {}
    rates = {k: teacher.mentions_per_s if key is None else extra.get(key) for k, key in TEACHER_RATES.items()}
    return {"teacher_mentions_per_s": rates, "kb_encode_s": extra.get("kb_encode_s"),
            "ratio": {r.name: {k: _ratio(r.mentions_per_s, v) for k, v in rates.items()}
                      for r in rows if _batched(r.name)}}


def _batched(name: str) -> bool:
    """A served row in process with batches of more than one mention (served_b64, served_b16_adaptive, ...)."""
    m = re.fullmatch(r"served_b(\d+)(_.+)?", name)
    return m is not None and int(m.group(1)) > 1


def report(rows: list[Row], **meta: Any) -> dict:
    add_ratios(rows)
    return {**meta, "rows": [asdict(r) for r in rows], "single_request": single_request(rows),
            "teacher_shortcuts": teacher_shortcuts(rows)}


def write_bench(rep: dict, out: Path) -> Path:
    """reports/bench.json and, beside it, the chart (.png); returns the chart's path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2))
    chart = out.with_suffix(".png")
    plot(rep, chart)
    return chart


def format_rows(rep: dict) -> str:
    lines = [(f"{'row':<34} {'n':>5} {'H@1':>6} {'ment/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu s/m':>8} "
             f"{'x plain':>7} {'x teach':>7}")]
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"
    for r in rep["rows"]:
        rp, rt = r["ratios"].get(PLAIN, {}), r["ratios"].get(TEACHER, {})
        lines.append(f"{r['name']:<34} {r['n']:>5} {f(r['h1'], '.4f'):>6} {f(r['mentions_per_s'], '.1f'):>8} "
                     f"{f(r['p50_ms'], '.2f'):>8} {f(r['p99_ms'], '.2f'):>8} {f(r['cpu_s_per_mention'], '.4f'):>8} "
                     f"{f(rp.get('mentions_per_s'), '.2f'):>7} {f(rt.get('mentions_per_s'), '.1f'):>7}")
    single = rep.get("single_request") or {}
    for name, ratio in single.get("p50_ratio", {}).items():
        lines.append(f"single request: {name} p50 = {f(ratio, '.2f')} x {single['baseline']}'s")
    teacher = rep.get("teacher_shortcuts") or {}
    if teacher:
        rates = ", ".join(f"{k} {f(v, '.2f')}" for k, v in teacher["teacher_mentions_per_s"].items())
        lines.append(f"teacher mentions/s, KB encoded beforehand ({teacher['kb_encode_s']} s once): {rates}")
    for name, ratios in teacher.get("ratio", {}).items():
        lines.append(f"{name} = " + ", ".join(f"{f(v, '.1f')} x the {k} teacher" for k, v in ratios.items()))
    for share in rep.get("http_shares") or ([rep["http_share"]] if rep.get("http_share") else []):
        each = ", ".join(f"{r['http_requests_per_s']:.1f}/{r['in_process_mentions_per_s']:.1f}" for r in share["rounds"])
        procs = share.get("workers", 1)
        lines.append(f"HTTP share at concurrency {share['concurrency']}"
                     f"{f', {procs} server processes' if procs > 1 else ''}, alternating rounds: median "
                     f"{share['median_share']:.2f} (HTTP req/s / in-process mentions/s: {each})")
    for note in rep.get("skipped", []):
        lines.append(f"skipped: {note}")
    return "\n".join(lines)


def plot(rep: dict, path: Path) -> None:
    """Left: throughput against H@1 per row; right: the latency percentiles of each row that has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rep["rows"] if not r["name"].startswith("ot_")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    points = [r for r in rows if r["h1"] is not None and r["mentions_per_s"]]
    colours = plt.get_cmap("tab20")
    for i, r in enumerate(points):  # the served rows sit close together at one H@1: a legend, not labels, names them
        a.scatter(r["mentions_per_s"], r["h1"], color=colours(i % 20), marker="os^Dv<>PX*"[i % 10], s=30,
                  label=r["name"])
    a.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    a.set_xscale("log")
    a.set_xlabel("mentions / s (log)")
    a.set_ylabel("H@1")
    a.set_title("throughput against H@1")
    lat = [r for r in rows if r["p50_ms"] is not None]
    for i, r in enumerate(lat):
        b.plot([r["p50_ms"], r["p95_ms"], r["p99_ms"]], [i] * 3, "-o", ms=4)
    b.set_yticks(range(len(lat)), [r["name"] for r in lat], fontsize=7)
    b.set_xscale("log")
    b.set_xlabel("ms per call: p50, p95, p99 (log)")
    b.set_title("latency distribution")
    m = rep.get("machine", {})
    fig.suptitle(f"{rep.get('n_mentions')} WikiMEL test mentions; {m.get('cpu', '')}, {m.get('cpus')} CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
