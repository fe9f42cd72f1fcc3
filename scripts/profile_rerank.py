"""Where the rerank stage's time goes, per mention, before vs after: each sub-stage in ms per mention, on N real
mentions in batches of 64 (the evaluation's batch), with the index and encoders of the EL_ settings.

    python scripts/profile_rerank.py [--n 640] [--batch 64] [--dataset wikimel] [--split test]
                                     [--baseline PATH] [--rounds 3] [--out reports/profile-rerank.json]

Each measurement runs in its own process: this tree's code ("after"), and with --baseline PATH a checkout of the
code to compare with ("before", e.g. `git worktree add /tmp/base main~1`), whose modules then come first on
sys.path. Runs alternate (before, after, before, after, ...) and each stage keeps its minimum over --rounds, so
other load on a shared machine hits both sides alike and is mostly filtered out.

Sub-stages (service/pipeline/types.py RERANK_STAGES): the Linker reports them in timings_ms; code from before
they existed is timed by wrapping the same functions (the assignment's solve -> rerank_sinkhorn, the rest of
cross_g2l -> rerank_pool, the rest of the cross scorer -> rerank_gather, string_terms, KGTerms.score).
"rerank_cpu" is the rerank stage's CPU time on the calling thread (torch runs the solve on it with
EL_RERANK__TORCH_THREADS=1), which other processes inflate far less than wall time.

Each side also records its ranking of every mention, so the report carries a golden check: H@1 and MRR of both
sides over the same mentions (gold answers), how many top-1s agree, and the largest change of any candidate's
rerank_score. Prints the JSON report and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("encode", "retrieve", "rerank", "rerank_gather", "rerank_sinkhorn", "rerank_pool", "rerank_strings",
          "rerank_kg", "rerank_cpu", "respond", "total")


def _wrap_old_code(acc: dict[str, float]) -> None:
    """Time the sub-stages of code that does not report them itself, by wrapping the functions that do the work."""
    import service.pipeline.linker as linker_mod
    from models import otmel
    from service.pipeline import rerank

    def add(stage: str, ms: float) -> None:
        acc[stage] = acc.get(stage, 0.0) + ms

    def timer(stage: str, fn):
        def wrapped(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                add(stage, (time.perf_counter() - t) * 1000)
        return wrapped

    make_assign = rerank._ot_assignment
    rerank._ot_assignment = lambda *a, **k: timer("rerank_sinkhorn", make_assign(*a, **k))
    rerank.solve = timer("_solve", rerank.solve)  # the zero-shot scorer's whole solve (the student's is in assign)
    otmel.cross_g2l = timer("_cross_g2l", otmel.cross_g2l)
    for name in ("student_rerank", "ot_rerank"):
        fn = timer("_cross", getattr(rerank, name))
        setattr(rerank, name, fn)
        setattr(linker_mod, name, fn)
    linker_mod.string_terms = timer("rerank_strings", linker_mod.string_terms)
    linker_mod.KGTerms.score = timer("rerank_kg", linker_mod.KGTerms.score)


def worker(args: argparse.Namespace) -> dict:
    """Link the mentions batch by batch in this process; per-stage ms per mention, and the rankings."""
    import torch  # noqa: F401  (threads are set by Linker.from_settings)

    from kg_index.build import load_entity_image
    from kg_index.readers import read_mentions
    from service.pipeline import linker as linker_mod
    from service.pipeline.types import LinkQuery
    from service.settings import Settings

    settings = Settings()
    mentions = read_mentions(settings.data_dir, args.dataset, args.split)[: args.n]
    native = "rerank_sinkhorn" in getattr(__import__("service.pipeline.types", fromlist=["x"]), "STAGES", ())
    extra: dict[str, float] = {}
    if not native:
        _wrap_old_code(extra)  # before the Linker exists: its snapshot binds the cross scorer
    linker = linker_mod.Linker.from_settings(settings)
    cpu = {"rerank_cpu": 0.0}
    score_terms = linker_mod.Snapshot.score_terms

    def timed_score_terms(self, *a, **k):
        t = time.thread_time()
        try:
            return score_terms(self, *a, **k)
        finally:
            cpu["rerank_cpu"] += (time.thread_time() - t) * 1000

    linker_mod.Snapshot.score_terms = timed_score_terms
    k = settings.rerank.candidates
    queries = [LinkQuery(m.mention, m.context, load_entity_image(m.image), top_k=k) for m in mentions]
    linker.link_batch(queries[: args.batch])  # warm up: lazy inits, page cache of the memory-mapped features
    extra.clear()
    cpu["rerank_cpu"] = 0.0
    totals: dict[str, float] = {}
    ranking: list[list[tuple[str, float, float]]] = []
    for i in range(0, len(queries), args.batch):
        out = linker.link_batch(queries[i : i + args.batch])
        for stage, ms in out.timings_ms.items():
            totals[stage] = totals.get(stage, 0.0) + ms
        ranking += [[(c.id, c.score, c.rerank_score) for c in r.entities] for r in out.results]
    if not native:  # split the cross scorer's time as the new code does
        solve_ms = extra.pop("_solve", 0.0)
        if "_cross_g2l" in extra:  # student: the solve is inside the assignment, which is inside cross_g2l
            extra["rerank_pool"] = extra.pop("_cross_g2l") - extra.get("rerank_sinkhorn", 0.0)
        else:  # zero-shot: the solve, and the similarities and scores around it (counted as gather here)
            extra["rerank_sinkhorn"], extra["rerank_pool"] = solve_ms, 0.0
        extra["rerank_gather"] = extra.pop("_cross", 0.0) - extra["rerank_pool"] - extra["rerank_sinkhorn"]
        totals.update(extra)
    totals.update(cpu)
    n = len(queries)
    return {"per_mention_ms": {s: round(totals[s] / n, 4) for s in STAGES if s in totals},
            "answers": [m.answer for m in mentions], "ranking": ranking,
            "torch_threads": __import__("torch").get_num_threads(), "sinkhorn_domain": getattr(
                settings.rerank, "sinkhorn_domain", "log"), "index_version": linker.index.version}


def _run(label: str, code: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--n", str(args.n), "--batch", str(args.batch),
           "--dataset", args.dataset, "--split", args.split]
    out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{label}: " + json.dumps(result["per_mention_ms"]), file=sys.stderr)
    return result


def _quality(run: dict) -> dict:
    """H@1 and MRR of the served ranking (the candidates, best first) against the gold answers."""
    ranks = []
    for answer, ranked in zip(run["answers"], run["ranking"]):
        ids = [c[0] for c in ranked]
        ranks.append(ids.index(answer) + 1 if answer in ids else 0)
    n = max(len(ranks), 1)
    return {"h@1": round(sum(r == 1 for r in ranks) / n, 4), "mrr": round(sum(1 / r for r in ranks if r) / n, 4)}


def _golden(before: dict, after: dict) -> dict:
    same_top1, diffs = 0, []
    for b, a in zip(before["ranking"], after["ranking"]):
        same_top1 += bool(b and a and b[0][0] == a[0][0])
        ours = {c[0]: c[2] for c in a}
        diffs += [abs(ours[i] - r) for i, _, r in b if i in ours]
    return {"top1_agree": f"{same_top1}/{len(before['ranking'])}",
            "max_rerank_score_change": max(diffs, default=0.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=640, help="mentions (the first N of the split)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dataset", default="wikimel")
    p.add_argument("--split", default="test")
    p.add_argument("--baseline", type=Path, help="checkout of the code to compare with (before)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "profile-rerank.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from service.offline.bench import machine_info

    sides = {"after": ROOT} | ({"before": args.baseline.resolve()} if args.baseline else {})
    runs: dict[str, list[dict]] = {label: [] for label in sides}
    for _ in range(args.rounds):
        for label in sorted(sides, reverse=True) if "before" in sides else sides:  # before first, then after
            runs[label].append(_run(label, sides[label], args))
    report: dict = {"n_mentions": args.n, "batch": args.batch, "dataset": args.dataset, "split": args.split,
                    "rounds": args.rounds, "machine": machine_info(), "how": "min over rounds of each stage's "
                    "ms per mention (wall; rerank_cpu: CPU time of the rerank stage's thread)"}
    for label, rs in runs.items():
        stages = {s: min(r["per_mention_ms"][s] for r in rs) for s in STAGES if all(s in r["per_mention_ms"] for r in rs)}
        report[label] = {"ms_per_mention": stages, **_quality(rs[0]), "torch_threads": rs[0]["torch_threads"],
                         "sinkhorn_domain": rs[0]["sinkhorn_domain"], "index_version": rs[0]["index_version"]}
    if "before" in runs:
        before, after = report["before"]["ms_per_mention"], report["after"]["ms_per_mention"]
        report["speedup"] = {s: round(before[s] / after[s], 2) for s in before if s in after and after[s] > 0}
        report["golden"] = _golden(runs["before"][0], runs["after"][0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
