"""Our Sinkhorn (models/sinkhorn.py) against POT's batched solver (`ot.batch.solve_batch`) on the reranker's real
problems, at equal marginal error.

    python scripts/bench_sinkhorn.py [--mentions 64] [--repeats 5] [--threads 1] [--out reports/bench-sinkhorn.json]

Ours is measured three ways: as served (domain auto on the CPU: compiled by numba, models/sinkhorn_numba.py), as
torch's batched kernel domain (the same iteration: the GPU's path), and in the log domain; --mentions 1 gives a
lone request's problems.

The problems are those of one served batch: the first --mentions WikiMEL test mentions, each against its
retrieved candidates (EL_RERANK__CANDIDATES), cost 1 - cosine of the student's token features, uniform marginals
over real tokens, eps = EL_RERANK__EPS; every problem is padded to the batch's longest mention and candidate, as
the reranker solved them before it grouped mentions by length (the padding carries no mass). The index and
encoders are those of the EL_ settings.

Each solver runs at several stopping points: POT at fixed iteration counts (tol 0; method "sinkhorn" and
"log_sinkhorn"), ours at several tolerances (early stopping per problem) in each domain. Every point's marginal
error is measured here, the same way for all (max over problems of the largest |row sum - a| or |column sum - b|
of the returned plan, in fp64), and its time is the fastest of --repeats runs, the points taking turns (one run
of each, then again), so that other load on a shared machine reaches every point alike; both wall time and the
CPU time of the solving thread (torch runs on it alone with --threads 1) are kept, the latter being far less
sensitive to other load. "matched" pairs each POT point
with our fastest point whose error is no larger. POT is an optional dependency (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def reranker_problems(n_mentions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(cost [P, N, M], a [P, N], b [P, M], eps) of the text unit for one batch of real mentions."""
    from kg_index.readers import read_mentions
    from service.pipeline.linker import Linker
    from service.settings import Settings

    settings = Settings()
    linker = Linker.from_settings(settings)
    index, featurizer = linker.index, linker._snapshot.featurizer
    mentions = read_mentions(settings.data_dir, "wikimel", "test")[:n_mentions]
    feats = featurizer([m.mention for m in mentions], [m.context for m in mentions], [None] * len(mentions))
    _, rows = index.search(feats.global_, settings.rerank.candidates)
    b, k = rows.shape
    flat = np.where(rows >= 0, rows, 0).reshape(-1)
    e_seg = np.asarray(index.text_seg[flat]) * (rows.reshape(-1, 1) >= 0)
    m = int(np.flatnonzero((e_seg > 0).any(0)).max(initial=0)) + 1
    n = int(np.flatnonzero((feats.text_seg > 0).any(0)).max(initial=0)) + 1
    q = torch.from_numpy(np.ascontiguousarray(feats.text_local[np.repeat(np.arange(b), k), :n]))
    e = torch.from_numpy(np.asarray(index.text_local[flat, :m], dtype=np.float32))
    from models.sinkhorn import uniform_marginals

    a = uniform_marginals(torch.from_numpy(np.repeat(feats.text_seg[:, :n] > 0, k, axis=0)))
    bm = uniform_marginals(torch.from_numpy(e_seg[:, :m] > 0))
    return 1.0 - q @ e.transpose(1, 2), a, bm, settings.rerank.eps


def marginal_error(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    p = plan.double()
    return float(torch.maximum((p.sum(-1) - a.double()).abs().amax(-1), (p.sum(-2) - b.double()).abs().amax(-1)).max())


def run_ms(fn) -> tuple[float, float]:
    """(wall ms, CPU ms of this thread): with one torch thread every solver runs on the calling thread, so its CPU
    time is its work, which waiting for a core on a loaded machine does not inflate."""
    t, c = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - t) * 1000, (time.thread_time() - c) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mentions", type=int, default=64, help="mentions in the batch (x candidates = problems)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the service's EL_RERANK__TORCH_THREADS)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench-sinkhorn.json")
    args = p.parse_args()

    from models import sinkhorn_numba
    from models.sinkhorn import OTProblem, solve
    from service.offline.bench import machine_info
    from service.pipeline.rerank import CHECK_EVERY, CHUNK

    cost, a, b, eps = reranker_problems(args.mentions)
    torch.set_num_threads(args.threads)
    problem = OTProblem(cost, a, b, eps)
    runs: list[tuple[str, str, object]] = []

    def record(solver: str, setting: str, fn) -> None:
        runs.append((solver, setting, fn))

    try:
        import ot  # noqa: F401
        from ot.batch import solve_batch
    except ImportError:
        solve_batch = None
        print("POT is not installed (pip install -e .[bench]): our solver only")
    if solve_batch is not None:
        for method, counts in (("sinkhorn", (10, 15, 20, 30)), ("log_sinkhorn", (15, 20))):
            for iters in counts:
                record(f"pot:{method}", f"max_iter={iters}",
                       lambda iters=iters, method=method: solve_batch(
                           cost, reg=eps, a=a, b=b, max_iter=iters, tol=0.0, method=method, grad="detach").plan)
    # The served settings (domain auto, compiled by numba; its checks), the same iteration in torch's batched kernel
    # domain (the GPU's path, and the CPU's before numba), and the log domain as served before both.
    tols = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7)
    configs = [("kernel", "kernel", "torch", CHUNK, CHECK_EVERY, tols), ("log", "log", "torch", 64, 1, (1e-4, 1e-5))]
    if sinkhorn_numba.AVAILABLE:
        configs.insert(0, ("numba", "auto", "numba", CHUNK, CHECK_EVERY, tols))
    else:
        print("numba is not installed: torch's kernel domain only")
    for label, domain, backend, chunk, check, tol_grid in configs:
        for tol in tol_grid:
            record(f"ours:{label}", f"tol={tol:g}",
                   lambda tol=tol, chunk=chunk, domain=domain, check=check, backend=backend: solve(
                       problem, max_iter=500, tol=tol, chunk_size=chunk, domain=domain, check_every=check,
                       backend=backend).plan)
    points = []
    for solver, setting, fn in runs:  # warm-up run, and the error of the plan
        points.append({"solver": solver, "setting": setting, "ms": float("inf"), "cpu_ms": float("inf"),
                       "marginal_error": marginal_error(fn(), a, b)})
    for _ in range(args.repeats):  # the points take turns
        for pt, (_, _, fn) in zip(points, runs):
            wall, cpu = run_ms(fn)
            pt["ms"], pt["cpu_ms"] = round(min(pt["ms"], wall), 2), round(min(pt["cpu_ms"], cpu), 2)
    for pt in points:
        print(json.dumps(pt))

    served = "ours:numba" if sinkhorn_numba.AVAILABLE else "ours:kernel"
    ours = [pt for pt in points if pt["solver"] == served]
    # The compiled solver against torch's kernel domain, tolerance by tolerance (the same iteration).
    by_tol = {pt["setting"]: pt for pt in points if pt["solver"] == "ours:kernel"}
    backends = [{"setting": o["setting"], "numba_cpu_ms": o["cpu_ms"], "torch_cpu_ms": by_tol[o["setting"]]["cpu_ms"],
                 "speedup_cpu": round(by_tol[o["setting"]]["cpu_ms"] / o["cpu_ms"], 2),
                 "speedup_wall": round(by_tol[o["setting"]]["ms"] / o["ms"], 2)}
                for o in points if o["solver"] == "ours:numba"]
    matched = []
    for pt in (pt for pt in points if pt["solver"].startswith("pot:")):
        fit = [o for o in ours if o["marginal_error"] <= pt["marginal_error"]]
        if fit:
            best = min(fit, key=lambda o: o["cpu_ms"])
            matched.append({"pot": pt, "ours": best, "speedup_cpu": round(pt["cpu_ms"] / best["cpu_ms"], 2),
                            "speedup_wall": round(pt["ms"] / best["ms"], 2)})
    report = {"problems": list(cost.shape), "eps": eps, "torch_threads": args.threads, "repeats": args.repeats,
              "machine": machine_info(), "how": "fastest of --repeats interleaved runs, wall (ms) and CPU time of the solving thread (cpu_ms, "
              "one torch thread); matched by cpu_ms; marginal error measured on the plan",
              "served": served, "points": points, "matched": matched, "numba_vs_torch_kernel": backends}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"matched": matched, "numba_vs_torch_kernel": backends}, indent=2))


if __name__ == "__main__":
    main()
