"""Our Sinkhorn (models/sinkhorn.py solve, with the reranker's own settings: domain, early stopping) against
POT's batched solver (ot.batch.solve_batch) on the problems the reranker actually solves, captured from service/pipeline/rerank.py
during one batch of the served pipeline, at equal marginal error.

Ours runs at the served settings (eps, max_iter, tol); its worst marginal error sets the target. Each POT method
runs at growing iteration counts (tol 0, so the count is exact) until its worst marginal error reaches that
target; the row is timed at that count (or at the largest tried, flagged `reached_target: false`).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from models.sinkhorn import OTProblem, solve, uses_numba
from service.offline.bench import Row

logger = logging.getLogger(__name__)

POT_ITERS = (3, 5, 10, 20, 40, 80, 160, 320)
POT_METHODS = ("sinkhorn", "log_sinkhorn")


@contextmanager
def capture_problems(sink: list[tuple[OTProblem, dict[str, Any]]]):
    """While active, every solve() the rerank stage calls is recorded in sink as (problem, its solver kwargs)."""
    from service.pipeline import rerank

    real = rerank.solve

    def recording(problem: OTProblem, **kwargs: Any):
        sink.append((problem, kwargs))
        return real(problem, **kwargs)

    rerank.solve = recording
    try:
        yield sink
    finally:
        rerank.solve = real


def marginal_error(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst |row sum - a| or |column sum - b| over the batch (NaN counts as inf)."""
    err = torch.maximum((plan.sum(-1) - a).abs().amax(-1), (plan.sum(-2) - b).abs().amax(-1))
    err = torch.nan_to_num(err, nan=float("inf"))
    return float(err.max()) if err.numel() else 0.0


def _with_mass(problem: OTProblem) -> OTProblem:
    """The problems with mass on both sides (an empty candidate slot has none: no solver needs it)."""
    keep = (problem.a.sum(-1) > 0) & (problem.b.sum(-1) > 0)
    return OTProblem(problem.cost[keep], problem.a[keep], problem.b[keep], problem.eps)


def _median_s(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Median wall seconds and median CPU seconds of fn over repeats, and its last output."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def ot_rows(captured: list[tuple[OTProblem, dict[str, Any]]], *, mentions: int, repeats: int = 3) -> list[Row]:
    """One row for ours and one per POT method over all captured problems (grouped as the reranker solved them)."""
    try:
        import ot.batch
    except ImportError as exc:
        raise ImportError(f"the POT rows need the bench extra: pip install -e '.[bench]' ({exc})") from exc
    groups = [(_with_mass(p), kw) for p, kw in captured]
    groups = [(p, kw) for p, kw in groups if p.cost.shape[0]]
    n_problems = sum(p.cost.shape[0] for p, _ in groups)
    shapes = sorted({tuple(p.cost.shape[1:]) for p, _ in groups})

    def ours():
        return [solve(p, **kw) for p, kw in groups]

    wall, cpu, results = _median_s(ours, repeats)
    target = max(marginal_error(r.plan, p.a, p.b) for r, (p, _) in zip(results, groups))
    iters = max(r.iterations for r in results)
    kw0 = groups[0][1] if groups else {}
    what = f"{n_problems} problems from {mentions} mentions (shapes {shapes[:4]}{'...' if len(shapes) > 4 else ''})"
    p0 = groups[0][0] if groups else None
    backend = "numba" if p0 is not None and uses_numba(kw0.get("backend", "auto"), kw0.get("domain", "auto"), p0.cost,
                                                       p0.a, p0.b) else "torch"
    rows = [_row("ot_ours", f"models/sinkhorn.py solve, {kw0.get('domain', 'log')} domain, {backend} backend, early "
                 f"stop (max_iter {kw0.get('max_iter')}, tol {kw0.get('tol')}): {what}", n_problems, mentions, wall,
                 cpu, {"max_marginal_error": target, "iterations": iters, "backend": backend,
                       "eps": groups[0][0].eps if groups else None})]
    for method in POT_METHODS:
        reached, err, n_it, w, c = False, float("inf"), 0, 0.0, 0.0
        for n_it in POT_ITERS:
            def pot(n_it: int = n_it, method: str = method) -> list:
                return [ot.batch.solve_batch(p.cost, reg=p.eps, a=p.a, b=p.b, max_iter=n_it, tol=0.0, method=method,
                                             grad="detach").plan for p, _ in groups]

            w, c, plans = _median_s(pot, repeats)
            err = max(marginal_error(plan, p.a, p.b) for plan, (p, _) in zip(plans, groups))
            if err <= target:
                reached = True
                break
        rows.append(_row(f"ot_pot_{method}", f"POT ot.batch.solve_batch(method='{method}'), {n_it} iterations: {what}",
                         n_problems, mentions, w, c, {"max_marginal_error": err, "iterations": n_it,
                                                      "reached_target": reached}))
    for r in rows[1:]:
        r.ratios = {"ot_ours": {"time": round(r.extra["wall_s"] / max(rows[0].extra["wall_s"], 1e-12), 3)}}
    return rows


def _row(name: str, what: str, problems: int, mentions: int, wall: float, cpu: float, extra: dict) -> Row:
    return Row(name, what, problems, round(mentions / wall, 1) if wall else None, None, None, None,
               round(cpu / max(mentions, 1), 6), extra={"wall_s": round(wall, 4), "ms_per_problem":
                                                          round(1000 * wall / max(problems, 1), 4), **extra})
