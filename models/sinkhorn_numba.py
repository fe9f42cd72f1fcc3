"""The kernel-domain Sinkhorn of models/sinkhorn.py for CPU tensors, compiled with numba: the same iteration, the
same per-problem early stopping and the same results (up to float rounding), without torch's per-operation cost.

Why: the reranker solves a few dozen to a few thousand small problems per call (a mention against its 32
candidates: 32 problems of about 15 x 39). In torch each iteration is a handful of batched operations of a few
microseconds each, plus the bookkeeping that freezes converged problems (boolean indexing, compaction), so a lone
mention's 32 problems cost ~0.8 ms of which the arithmetic is ~0.1 ms. Here each problem runs alone in compiled
code, its kernel in L1 cache from the first iteration to the plan, and stops at its own check: no freezing needed,
and a problem's result cannot depend on its neighbours. One thread per call, without the GIL: the pipeline's two
halves (service/pipeline/halves.py) solve at once.

Three steps per call: the exponents (lo - cost) / eps and each problem's smallest real cost lo (compiled), the
exponential (numpy's vectorised exp: a compiled scalar exp would cost more than the iterations), then the
iterations, each problem from start to plan (compiled). A problem the kernel domain cannot hold in its dtype (see
models/sinkhorn.py kernel_safe: an infinite or NaN real cost, or a kernel entry below exp(-KERNEL_SPAN)) comes back
marked unsafe, and solve() runs it in the log domain.

Compiled on first use per dtype (about 1.5 s) and cached on disk (numba's cache, beside this file or in
NUMBA_CACHE_DIR), so a warmed-up server never compiles on a request.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

logger = logging.getLogger(__name__)

try:
    from numba import njit
except ImportError:  # the torch solver serves alone (models/sinkhorn.py falls back)
    njit = None

AVAILABLE = njit is not None

# Reassociation lets the row sums vectorise (a different float rounding order, as any BLAS); no "nnan"/"ninf":
# the finite checks must stay.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def _exponents(cost, a, b, inv_eps, out, lo_out, finite_out):  # pragma: no cover - compiled
    """out [C, N, M] = (lo - cost) * inv_eps on real pairs (a > 0 and b > 0), -inf elsewhere; lo_out [C] the
    smallest real cost (0 without real entries); finite_out [C] whether every real cost is finite."""
    n_problems, n, m = cost.shape
    zero = inv_eps - inv_eps
    inf = zero + np.float32(np.inf)
    for c in range(n_problems):
        lo = inf
        total = zero  # inf or NaN once any real cost is
        bc = b[c]
        for i in range(n):
            if a[c, i] > 0:
                row = cost[c, i]
                for j in range(m):
                    if bc[j] > 0:
                        x = row[j]
                        total += x
                        if x < lo:  # noqa: PLR1730 - a plain compare: numba's min() also orders NaN
                            lo = x
        if lo == inf:  # no real entry (or only +inf ones: unsafe anyway)
            lo = zero
        lo_out[c] = lo
        finite_out[c] = np.isfinite(total)
        for i in range(n):
            o = out[c, i]
            if a[c, i] > 0:
                row = cost[c, i]
                for j in range(m):
                    o[j] = (lo - row[j]) * inv_eps
                for j in range(m):
                    if bc[j] <= 0:
                        o[j] = -inf
            else:
                o[:] = -inf


def _mat_vec(k, v, out):  # pragma: no cover - compiled
    """out = K v (rows of k [N, M] against v [M]); the sums vectorise under reassociation."""
    for i in range(k.shape[0]):
        row = k[i]
        acc = out.dtype.type(0.0)
        for j in range(k.shape[1]):
            acc += row[j] * v[j]
        out[i] = acc


def _vec_mat(u, k, out):  # pragma: no cover - compiled
    """out = K^T u, accumulated row by row (contiguous rows of k [N, M])."""
    out[:] = 0.0
    for i in range(k.shape[0]):
        ui = u[i]
        row = k[i]
        for j in range(k.shape[1]):
            out[j] += ui * row[j]


def _marginal_error(x, kx, target):  # pragma: no cover - compiled
    """max |x * (K x') - target|: a side's marginal error from its scaling and the product it divides by."""
    worst = target.dtype.type(0.0)
    for i in range(target.shape[0]):
        worst = max(worst, abs(x[i] * kx[i] - target[i]))
    return worst


def _iterate(k, a, b, lo, inv_eps, max_iter, tol, check_every, early_stop, limit, finite,
             err_out, its_out, safe_out):  # pragma: no cover - compiled
    """Sinkhorn on kernels k [C, N, M] (exp of _exponents' output; overwritten with the plans u K v), problem by
    problem: the loop of models/sinkhorn.py _solve_chunk_kernel, each problem stopping at its own check."""
    n_problems, n, m = k.shape
    zero = inv_eps - inv_eps
    one = zero + np.float32(1.0)
    u = np.empty(n, k.dtype)
    v = np.empty(m, k.dtype)
    kv = np.empty(n, k.dtype)
    ktu = np.empty(m, k.dtype)
    pad_r = np.empty(n, k.dtype)  # 1 on padding: a / (K v + 1) = 0 there, never 0 / 0
    pad_c = np.empty(m, k.dtype)
    for c in range(n_problems):
        kc = k[c]
        ac = a[c]
        bc = b[c]
        has_r = False
        has_c = False
        for i in range(n):
            has_r |= ac[i] > 0
            pad_r[i] = zero if ac[i] > 0 else one
            u[i] = one - pad_r[i]
        for j in range(m):
            has_c |= bc[j] > 0
            pad_c[j] = zero if bc[j] > 0 else one
            v[j] = one - pad_c[j]
        smallest = one
        for i in range(n):
            if ac[i] > 0:
                row = kc[i]
                for j in range(m):
                    if bc[j] > 0 and row[j] < smallest:
                        smallest = row[j]
        safe = finite[c] and smallest >= limit
        safe_out[c] = safe
        if not safe:
            err_out[c] = zero
            its_out[c] = 0
            continue
        if not early_stop:  # u only matters at max_iter = 0: the plain kernel exp(-cost / eps) = exp(-lo / eps) K
            s = np.exp(-lo[c] * inv_eps)
            for i in range(n):
                u[i] *= s
        _mat_vec(kc, v, kv)
        _vec_mat(u, kc, ktu)
        its = 0
        if has_r and has_c:  # a problem without mass on both sides never starts (zero plan)
            while its < max_iter:
                for i in range(n):
                    u[i] = ac[i] / (kv[i] + pad_r[i])
                _vec_mat(u, kc, ktu)
                for j in range(m):
                    v[j] = bc[j] / (ktu[j] + pad_c[j])
                _mat_vec(kc, v, kv)
                its += 1
                # Columns match b after the v-update; the row sums are u * (K v).
                if early_stop and its % check_every == 0 and its < max_iter and _marginal_error(u, kv, ac) <= tol:
                    break
        err_out[c] = max(_marginal_error(u, kv, ac), _marginal_error(v, ktu, bc))
        its_out[c] = its
        for i in range(n):
            ui = u[i]
            row = kc[i]
            for j in range(m):
                row[j] = ui * row[j] * v[j]  # padding: K = 0, exactly zero


def _compiled(fn):
    try:
        return njit(cache=True, nogil=True, fastmath=_FASTMATH)(fn)
    except RuntimeError as exc:  # no writable cache folder (set NUMBA_CACHE_DIR): compiled once per process
        logger.info("numba cannot cache %s (%s): compiling it in each process", fn.__name__, exc)
        return njit(cache=False, nogil=True, fastmath=_FASTMATH)(fn)


if AVAILABLE:  # helpers first: the compiled callers resolve them by name when they compile
    _mat_vec = _compiled(_mat_vec)
    _vec_mat = _compiled(_vec_mat)
    _marginal_error = _compiled(_marginal_error)
    _exponents = _compiled(_exponents)
    _iterate = _compiled(_iterate)


def solve_kernel(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, *, max_iter: int, tol: float,
                 early_stop: bool, check_every: int, span: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU fp32/fp64 cost [B, N, M], a [B, N], b [B, M] -> (plan [B, N, M], marginal_error [B], iterations [B],
    safe [B]). Rows where safe is False hold nothing meaningful: the caller solves them in the log domain.
    ``span``: the kernel domain's limit on (max - min real cost) / eps for this dtype (KERNEL_SPAN)."""
    if not AVAILABLE:
        raise RuntimeError("numba is not installed")
    cost_np = cost.detach().contiguous().numpy()
    dt = cost_np.dtype.type
    a_np = a.detach().to(cost.dtype).contiguous().numpy()
    b_np = b.detach().to(cost.dtype).contiguous().numpy()
    n_problems = cost_np.shape[0]
    inv_eps = dt(1.0 / eps)
    k = np.empty_like(cost_np)
    lo = np.empty(n_problems, cost_np.dtype)
    finite = np.empty(n_problems, np.bool_)
    _exponents(cost_np, a_np, b_np, inv_eps, k, lo, finite)
    np.exp(k, out=k)  # -inf -> exactly 0 on padding
    err = np.empty(n_problems, cost_np.dtype)
    its = np.empty(n_problems, np.int64)
    safe = np.empty(n_problems, np.bool_)
    _iterate(k, a_np, b_np, lo, inv_eps, max_iter, dt(tol), check_every, early_stop, dt(math.exp(-span)), finite,
             err, its, safe)
    return torch.from_numpy(k), torch.from_numpy(err), torch.from_numpy(its), torch.from_numpy(safe)
