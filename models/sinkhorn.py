"""Batched entropic optimal transport (Sinkhorn-Knopp) in torch, in the log or the kernel (standard) domain, with
the kernel domain of "auto" on the CPU compiled by numba where it is installed (models/sinkhorn_numba.py, same
iteration and results, several times faster on small problems; ``backend``): the one solver of the project, used by
the served reranker (service/pipeline/rerank.py, early stopping) and by the OT-MEL teacher (models/otmel.py, a fixed
number of iterations). It lives in models/ because models/ may not import service/.

Problem, solver and result are separate (ott-jax style): build an :class:`OTProblem`, call
:func:`solve`, read the :class:`OTResult`. The result always carries ``converged``, the iteration
count and the marginal error, so callers feed them to metrics instead of relying on warnings.

Conventions
- Shapes: ``cost`` [B, N, M], ``a`` [B, N], ``b`` [B, M]. Zero-mass entries of ``a``/``b`` are padding:
  their rows/columns of the plan are exactly zero and their cost values are ignored (even inf/NaN).
- The cost is never rescaled, so ``eps`` is in the cost's units; the reranker passes ``1 - cosine``
  in [0, 2], where eps = 0.05 converges in about 15-20 iterations. Internally the cost is shifted, which
  leaves the plan unchanged and helps fp32: the log domain shifts each row and column by its minimum (see
  ``_shift``), the kernel domain the whole problem by its smallest real cost (see ``_kernel``).
  ``OTResult.cost`` uses the cost as given.
- Domains (``domain``): "log" iterates dual potentials with logsumexp and is stable at any eps (the kernel
  exp(-cost / eps) underflows in fp32 once cost span / eps passes ~87, e.g. eps <= 0.02 on costs in [0, 2]).
  "kernel" iterates scalings u <- a / (K v), v <- b / (K^T u) with batched matrix products: no exp or log in
  the loop, about 10x faster on CPU. "auto" (the default) picks per problem: the kernel domain where
  :func:`kernel_safe` says the problem's dtype holds it (span / eps <= KERNEL_SPAN), else the log domain. Both
  converge to the same plan (early stopping leaves them apart by up to ``tol``: the log domain starts from the
  potentials (0, 0) of its row/column-shifted problem, the kernel domain from those of the problem as given),
  and an item's domain depends on that item alone.
- Early stopping is per problem: an item whose row-marginal error reaches ``tol`` at a check (every
  ``check_every`` iterations) is frozen (its potentials stop updating), so its result does not depend on the
  other problems in its batch or chunk, nor on ``chunk_size``. A chunk stops when all its items are frozen or at
  ``max_iter``.
- ``early_stop=False`` is OT-MEL's fixed-iteration Sinkhorn (the teacher's assignment): every problem with
  mass runs exactly ``max_iter`` iterations, from the potentials (0, 0) of the *unshifted* problem, so the
  plan after a given count is the plain iteration's (u <- log a - LSE(log K + v), v <- log b - LSE(log K^T + u)).
  ``tol`` then only decides ``converged`` in the report.
- fp32 and fp64 are computed in their own dtype; half precision (fp16/bf16) is computed in fp32 and
  the plan is cast back to the input dtype (``marginal_error`` is measured before that cast).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

logger = logging.getLogger(__name__)

# Finite stand-in for log(0) on masked (padding) entries: -inf would make logsumexp over an
# all-padding row return -inf and turn (-inf) - (-inf) into NaN (also in autograd). 1e30 dwarfs any
# realistic |cost| / eps yet leaves room for sums of a few such terms in fp32 (max ~3.4e38).
_NEG = -1e30

Domain = Literal["auto", "log", "kernel"]
# Who runs the kernel domain of "auto" on the CPU: "numba" (models/sinkhorn_numba.py: compiled, problem by problem,
# several times faster on the reranker's small problems), "torch" (batched tensor operations; also every GPU
# solve and the forced "kernel" and "log" domains), or "auto": numba where it is installed.
Backend = Literal["auto", "torch", "numba"]

# Largest span / eps (span = max - min of a problem's real costs) that "auto" solves in the kernel domain, per
# dtype (see kernel_safe): exp(-50) ~ 2e-22 and exp(-300) ~ 5e-131 stay far above the smallest normal numbers of
# fp32 (1.2e-38) and fp64 (2.2e-308), with room for the scalings' own range.
KERNEL_SPAN = {torch.float32: 50.0, torch.float64: 300.0}


@dataclass(frozen=True)
class OTProblem:
    """A batch of entropic OT problems: min <P, cost> - eps * H(P) s.t. P 1 = a, P^T 1 = b."""

    cost: torch.Tensor  # [B, N, M]
    a: torch.Tensor  # [B, N] source marginals; each row sums to 1; zeros = padding
    b: torch.Tensor  # [B, M] target marginals; same rules
    eps: float  # entropic regulariser, > 0, in the cost's units

    def __post_init__(self) -> None:
        # Shape/eps checks only: checking that marginals sum to 1 would force a device sync.
        if self.cost.ndim != 3:
            raise ValueError(f"cost must be [B, N, M], got shape {tuple(self.cost.shape)}")
        bsz, n, m = self.cost.shape
        if tuple(self.a.shape) != (bsz, n):
            raise ValueError(f"a must be [B, N] = {(bsz, n)}, got {tuple(self.a.shape)}")
        if tuple(self.b.shape) != (bsz, m):
            raise ValueError(f"b must be [B, M] = {(bsz, m)}, got {tuple(self.b.shape)}")
        if not self.cost.is_floating_point():
            raise TypeError(f"cost must be a floating tensor, got {self.cost.dtype}")
        if not (self.a.device == self.b.device == self.cost.device):
            raise ValueError("cost, a and b must be on the same device")
        if not (isinstance(self.eps, (int, float)) and 0.0 < float(self.eps) < float("inf")):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")


@dataclass(frozen=True)
class OTResult:
    """Solver output. ``plan`` has the dtype and device of ``problem.cost``."""

    plan: torch.Tensor  # [B, N, M] rows sum to a, columns to b; zero on padding
    converged: torch.Tensor  # [B] bool: marginal_error <= tol
    iterations: int  # iterations actually run (max over chunks)
    marginal_error: torch.Tensor  # [B] max |row sums - a| and |col sums - b| (up to float rounding)

    def cost(self, problem: OTProblem) -> torch.Tensor:
        """[B] transport cost <plan, cost> of this result for ``problem``."""
        return transport_cost(self.plan, problem.cost)


def transport_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """[B] <plan, cost>; entries with zero mass contribute 0 even where cost is inf/NaN (padding)."""
    contrib = torch.where(plan != 0, plan * cost, torch.zeros((), dtype=plan.dtype, device=plan.device))
    return contrib.sum(dim=(-2, -1))


def uniform_marginals(mask: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, N] bool mask -> [B, N] uniform weights over True entries, 0 elsewhere.

    An all-False row gives all zeros (not NaN). ``dtype`` defaults to torch's default float dtype.
    """
    weights = mask.to(dtype or torch.get_default_dtype())
    counts = weights.sum(dim=-1, keepdim=True).clamp(min=1.0)  # clamp: empty rows stay 0, no 0/0
    return weights / counts


def solve(problem: OTProblem, *, max_iter: int = 50, tol: float = 1e-4, chunk_size: int | None = 256,
          early_stop: bool = True, domain: Domain = "auto", check_every: int = 1, backend: Backend = "auto") -> OTResult:
    """Solve each problem of the batch with Sinkhorn.

    ``chunk_size`` problems are processed at a time (None: the whole batch at once). Results do not depend on
    ``chunk_size`` or on batch neighbours (converged items are frozen, see module doc).
    ``early_stop=False``: exactly ``max_iter`` iterations for every problem with mass (see module doc).
    ``domain``: "log", "kernel", or "auto" (per problem: the kernel domain where fp32/fp64 is safe, see
    :func:`kernel_safe`). ``check_every``: test convergence (and freeze) every this many iterations; an item then
    stops at the first multiple of it where its marginal error is within ``tol``, whatever its neighbours.
    ``backend``: see :data:`Backend` (numba ignores ``chunk_size``: it holds one problem at a time anyway).
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if domain not in ("auto", "log", "kernel"):
        raise ValueError(f"domain must be 'auto', 'log' or 'kernel', got {domain!r}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")

    cost = problem.cost
    out_dtype = cost.dtype
    work_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    bsz, n, m = cost.shape
    if bsz == 0 or n == 0 or m == 0:
        # Nothing to transport; no mass means nothing to violate.
        return OTResult(
            plan=torch.zeros_like(cost),
            converged=torch.ones(bsz, dtype=torch.bool, device=cost.device),
            iterations=0,
            marginal_error=torch.zeros(bsz, dtype=work_dtype, device=cost.device),
        )

    cost, a, b = cost.to(work_dtype), problem.a.to(work_dtype), problem.b.to(work_dtype)
    eps = float(problem.eps)
    loop = (max_iter, tol, early_stop, check_every, chunk_size)
    if domain == "auto" and not early_stop and max_iter == 0:
        domain = "log"  # the plain kernel exp(-cost / eps) itself: the log domain keeps it without underflow
    if domain == "log":
        plan, marginal_error, iterations = _solve_chunks(_solve_chunk, (cost, a, b), eps, *loop)
    elif uses_numba(backend, domain, cost, a, b):
        plan, marginal_error, iterations = _solve_numba(cost, a, b, eps, loop)
    else:
        pair = (a > 0)[:, :, None] & (b > 0)[:, None, :]
        kernel, lo = _kernel(cost, pair, eps)
        safe = _kernel_safe(kernel, lo, pair) if domain == "auto" else None
        n_safe = bsz if safe is None else int(safe.sum())
        if n_safe == bsz:
            plan, marginal_error, iterations = _solve_chunks(_solve_chunk_kernel, (kernel, a, b, lo), eps, *loop)
        elif n_safe == 0:
            plan, marginal_error, iterations = _solve_chunks(_solve_chunk, (cost, a, b), eps, *loop)
        else:  # a mix: each group in its domain (per problem: never decided by a neighbour), then batch order
            assert safe is not None
            k_rows, l_rows = torch.nonzero(safe).flatten(), torch.nonzero(~safe).flatten()
            parts = [_solve_chunks(_solve_chunk_kernel, (kernel[k_rows], a[k_rows], b[k_rows], lo[k_rows]), eps, *loop),
                     _solve_chunks(_solve_chunk, (cost[l_rows], a[l_rows], b[l_rows]), eps, *loop)]
            inverse = torch.argsort(torch.cat([k_rows, l_rows]))
            plan = torch.cat([p[0] for p in parts])[inverse]
            marginal_error = torch.cat([p[1] for p in parts])[inverse]
            iterations = max(p[2] for p in parts)

    converged = marginal_error <= tol
    if logger.isEnabledFor(logging.DEBUG):  # guarded: .item() would sync the device on every call
        logger.debug(
            "sinkhorn: B=%d N=%d M=%d eps=%g domain=%s iterations=%d converged=%d/%d max_err=%.3g",
            bsz,
            n,
            m,
            problem.eps,
            domain,
            iterations,
            int(converged.sum().item()),
            bsz,
            marginal_error.max().item(),
        )
    return OTResult(plan=plan.to(out_dtype), converged=converged, iterations=iterations, marginal_error=marginal_error)


def uses_numba(backend: Backend, domain: Domain, cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether solve() runs these problems' kernel domain compiled by numba (models/sinkhorn_numba.py)."""
    if backend == "torch" or domain != "auto" or cost.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (cost.requires_grad or a.requires_grad or b.requires_grad):
        return False  # numba's plan carries no gradient: training differentiates through the torch solver
    from models import sinkhorn_numba

    if backend == "numba" and not sinkhorn_numba.AVAILABLE:
        raise RuntimeError("backend='numba' needs numba (pip install numba)")
    return sinkhorn_numba.AVAILABLE


def _solve_numba(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
                 loop: tuple) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Domain "auto" on the CPU through numba: the kernel domain where the problem's dtype holds it, the problems it
    cannot hold (kernel_safe's rule) in the torch log domain."""
    from models import sinkhorn_numba

    max_iter, tol, early_stop, check_every, _ = loop
    plan, marginal_error, its, safe = sinkhorn_numba.solve_kernel(
        cost, a, b, eps, max_iter=max_iter, tol=tol, early_stop=early_stop, check_every=check_every,
        span=KERNEL_SPAN.get(cost.dtype, KERNEL_SPAN[torch.float32]))
    iterations = int(its.max()) if its.numel() else 0
    if not bool(safe.all()):
        rows = torch.nonzero(~safe).flatten()
        log_plan, log_err, log_its = _solve_chunks(_solve_chunk, (cost[rows], a[rows], b[rows]), eps, *loop)
        plan[rows], marginal_error[rows] = log_plan, log_err
        iterations = max(iterations, log_its)
    return plan, marginal_error, iterations


def kernel_safe(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """[B] bool: the problems that "auto" solves in the kernel domain (cost in fp32 or fp64).

    The kernel is exp(-(cost - lo) / eps) with lo the problem's smallest real cost, so its real entries lie in
    [exp(-span / eps), 1], span = max - min of the real costs. With span / eps <= KERNEL_SPAN[dtype] (50 in fp32:
    exp(-50) ~ 2e-22, far above fp32's smallest normal 1.2e-38) no entry underflows, the scalings stay within
    about exp(+-span / eps), and sums of positive terms lose no relative precision: the kernel domain is as
    accurate as the log domain. The reranker's 1 - cosine costs (span <= 2) at eps 0.05 give 40. A problem with
    an infinite or NaN real cost goes to the log domain; one without mass counts as safe (its plan is zero).
    """
    pair = (a > 0)[:, :, None] & (b > 0)[:, None, :]
    return _kernel_safe(*_kernel(cost, pair, eps), pair)


def _kernel(cost: torch.Tensor, pair: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel [B, N, M] = exp(-(cost - lo) / eps), exactly 0 on padding; lo [B] the smallest real cost, 0 for a
    problem without real entries). Shifting a problem's cost by a constant changes neither its plan nor eps's
    meaning; it puts the kernel's largest real entry at 1 (no overflow, and underflow only past the span)."""
    masked = torch.where(pair, cost, float("inf"))  # padding ignored whatever its value (inf, NaN)
    lo = masked.amin(dim=(1, 2))
    lo = torch.where(torch.isinf(lo) & (lo > 0), 0.0, lo)  # no real entry: any shift will do
    # exp(lo / eps - masked / eps) in one fused pass before the exp; padding: exp(-inf) = 0.
    return torch.exp(torch.add((lo / eps)[:, None, None], masked, alpha=-1.0 / eps)), lo


def _kernel_safe(kernel: torch.Tensor, lo: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    smallest = torch.where(pair, kernel, 1.0).amin(dim=(1, 2))  # exp(-span / eps); 0 after an inf cost; NaN
    limit = math.exp(-KERNEL_SPAN.get(kernel.dtype, KERNEL_SPAN[torch.float32]))
    return torch.isfinite(lo) & (smallest >= limit)


def _solve_chunks(chunk, tensors: tuple[torch.Tensor, ...], eps: float, max_iter: int, tol: float,
                  early_stop: bool, check_every: int, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """chunk(*tensors[start:stop], eps, ...) chunk after chunk -> (plan, marginal_error, iterations = max)."""
    bsz = tensors[0].shape[0]
    if bsz == 0:
        return tensors[0].new_zeros(tensors[0].shape), tensors[0].new_zeros(0), 0
    step = bsz if chunk_size is None else chunk_size
    plans, errors = [], []
    iterations = 0
    for start in range(0, bsz, step):
        part = [t[start : start + step] for t in tensors]
        plan, err, its = chunk(*part, eps, max_iter, tol, early_stop, check_every)
        plans.append(plan)
        errors.append(err)
        iterations = max(iterations, its)
    plan = plans[0] if len(plans) == 1 else torch.cat(plans, dim=0)
    marginal_error = errors[0] if len(errors) == 1 else torch.cat(errors, dim=0)
    return plan, marginal_error, iterations


def _shift(cost: torch.Tensor, pair_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shift each row, then each column, by its minimum over real entries -> (shifted cost with +inf on padding,
    row_shift [C, N, 1], col_shift [C, 1, M]).

    Under the marginal constraints this adds a constant to <P, C>, so the plan and the meaning of eps are
    unchanged (from matching starts the iterates are the same up to a change of variables of u, v); it keeps the
    log-domain quantities near 0, where fp32 is precise (e.g. a constant cost of 1e4 at eps 0.005 is exact), and
    puts a zero cost (a kernel entry of 1) in every real row and column.
    """
    zero = torch.zeros((), dtype=cost.dtype, device=cost.device)
    inf = torch.full((), float("inf"), dtype=cost.dtype, device=cost.device)
    real_cost = torch.where(pair_mask, cost, inf)  # padding ignored whatever its value (inf, NaN)
    row_min = real_cost.amin(dim=-1, keepdim=True)
    row_shift = torch.where(torch.isfinite(row_min), row_min, zero)  # [C, N, 1]
    real_cost = real_cost - row_shift
    col_min = real_cost.amin(dim=-2, keepdim=True)
    col_shift = torch.where(torch.isfinite(col_min), col_min, zero)  # [C, 1, M]
    return real_cost - col_shift, row_shift, col_shift


def _solve_chunk(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int, tol: float, early_stop: bool,
    check_every: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Log domain, one chunk: cost [C, N, M], a [C, N], b [C, M] -> (plan [C, N, M], marginal_error [C], iterations)."""
    row_mask = a > 0  # [C, N]
    col_mask = b > 0  # [C, M]
    pair_mask = row_mask[:, :, None] & col_mask[:, None, :]  # [C, N, M]
    zero = torch.zeros((), dtype=cost.dtype, device=cost.device)

    real_cost, row_shift, col_shift = _shift(cost, pair_mask)
    # log kernel; padding entries get a finite -1e30 (keeps every LSE finite, no -inf - -inf).
    # The clamp keeps an inf cost on a real entry finite too (it becomes "as good as padding").
    log_k = torch.where(pair_mask, (-real_cost / eps).clamp(min=_NEG), _NEG)
    # Contiguous transposed copy: the column LSE then reduces over the contiguous last dim (faster on CPU).
    log_k_t = log_k.transpose(1, 2).contiguous()  # [C, M, N]
    log_a = torch.where(row_mask, torch.log(torch.where(row_mask, a, 1.0)), zero)  # inner where: no log(0)
    log_b = torch.where(col_mask, torch.log(torch.where(col_mask, b, 1.0)), zero)

    # Scaled dual potentials u = f / eps, v = g / eps; the plan is exp(u_i + log_k_ij + v_j).
    # Early stopping starts from (0, 0) of the shifted problem. Fixed iterations start from (0, 0) of the
    # unshifted one, i.e. minus the shifts here, so that a fixed count (even 0) gives the plain iteration's
    # plan, as in OT-MEL's release. (Only v's start matters from the first u-update on.)
    if early_stop:
        u, v = torch.zeros_like(a), torch.zeros_like(b)
    else:
        u = torch.where(row_mask, -row_shift[:, :, 0] / eps, zero)
        v = torch.where(col_mask, -col_shift[:, 0, :] / eps, zero)
    # Items without mass on both sides are done before starting (all-padding -> zero plan).
    active = row_mask.any(dim=-1) & col_mask.any(dim=-1)  # [C]
    lse_row = _lse_last(log_k, v)  # [C, N]
    its = 0
    running = bool(active.any())
    while its < max_iter and running:
        act = active[:, None]
        u = torch.where(act, torch.where(row_mask, log_a - lse_row, zero), u)
        lse_col = _lse_last(log_k_t, u)  # [C, M]
        v = torch.where(act, torch.where(col_mask, log_b - lse_col, zero), v)
        its += 1
        lse_row = _lse_last(log_k, v)
        if early_stop and its % check_every == 0:
            # After the v-update columns match b exactly; the row sums are exp(u + lse_row), and this
            # lse_row is reused by the next u-update, so the convergence check costs nothing extra.
            row_err = (torch.exp(u + lse_row) - a).abs().amax(dim=-1)  # padding rows: exp(~-1e30) - 0 = 0
            active = active & (row_err > tol)  # freeze converged items: result independent of neighbours
            running = bool(active.any())

    plan = torch.where(pair_mask, torch.exp(u[:, :, None] + log_k + v[:, None, :]), zero)
    # Marginal error of this plan, computed in the log domain exactly as the loop's stopping test
    # (lse_row is current: u, v have not changed since). Summing `plan` instead would differ by float
    # rounding (~1e-7 in fp32) and could flag an item the loop stopped on as not converged.
    row_err = (torch.exp(u + lse_row) - a).abs().amax(dim=-1)
    if its == 0:
        lse_col = _lse_last(log_k_t, u)  # else the loop's last lse_col is current: u has not changed since
    col_err = (torch.exp(v + lse_col) - b).abs().amax(dim=-1)
    return plan, torch.maximum(row_err, col_err), its


def _lse_last(log_k: torch.Tensor, pot: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of log_k [C, R, S] + pot [C, S] -> [C, R] (contiguous reduction)."""
    return torch.logsumexp(log_k + pot[:, None, :], dim=-1)


def _solve_chunk_kernel(
    k: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, eps: float, max_iter: int, tol: float,
    early_stop: bool, check_every: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Kernel (standard) domain, one chunk: kernel k [C, N, M] (see ``_kernel``), a, b, lo [C] -> as ``_solve_chunk``.

    Scalings u = exp(f / eps), v = exp(g / eps); the plan is u_i K_ij v_j. Each half-step is a batched row-vector x
    matrix product (bmm of [C, 1, S] by [C, S, R], which MKL runs several times faster than the matrix x
    column-vector form), hence K and its transpose are both kept contiguous. No logsumexp, no exp in the loop.
    Both modes start from v = 1 on real columns: the potentials (0, 0) of the problem as given (its cost shift
    only scales v, which the first u-update absorbs), so a fixed count gives the plain iteration's plan.
    Frozen items leave the working set at the check where they converge (their scalings are kept as they were
    then), so the remaining iterations only touch the items still running.
    """
    row_mask = a > 0
    col_mask = b > 0
    k_t = k.transpose(1, 2).contiguous()  # [C, M, N]
    # Padding rows/columns have no kernel mass: adding 1 to their denominators gives a / 1 = 0 (no 0 / 0).
    pad_r = (~row_mask).to(k.dtype)
    pad_c = (~col_mask).to(k.dtype)
    u, v = row_mask.to(k.dtype), col_mask.to(k.dtype)
    if not early_stop:  # u only matters at max_iter = 0: the plain kernel exp(-cost / eps) = exp(-lo / eps) K
        u = u * torch.exp(-lo / eps)[:, None]
    kv = _vec_mat(v, k_t)  # [C, N] = K v
    ktu = _vec_mat(u, k)  # [C, M] = K^T u

    # Working set: the items still iterating (rows `idx` of the chunk). Items without mass on both sides never
    # start (zero plan).
    idx = torch.nonzero(row_mask.any(dim=-1) & col_mask.any(dim=-1)).flatten()
    if max_iter == 0 or len(idx) == 0:
        return _kernel_finish(k, a, b, u, v, kv, ktu, 0)
    whole = len(idx) == k.shape[0]
    wk, wk_t, wa, wb, wpr, wpc = (t if whole else t[idx] for t in (k, k_t, a, b, pad_r, pad_c))
    wkv = kv if whole else kv[idx]
    live = torch.ones(len(idx), dtype=torch.bool, device=k.device)  # working rows not frozen yet
    n_live = len(idx)
    frozen: list[tuple[torch.Tensor, ...]] = []  # (rows, u, v, kv, ktu) of items frozen at a check
    its = 0
    while its < max_iter:
        wu = wa / (wkv + wpr)
        wktu = _vec_mat(wu, wk)
        wv = wb / (wktu + wpc)
        wkv = _vec_mat(wv, wk_t)
        its += 1
        if early_stop and its % check_every == 0 and its < max_iter:
            # Columns match b after the v-update; the row sums are u * (K v), with the K v the next u-update uses.
            done = live & ((wu * wkv - wa).abs().amax(dim=-1) <= tol)
            n_done = int(done.sum())
            if n_done:
                # Frozen: their scalings are kept as they are now. They stay in the working set (whatever it
                # computes for them later is discarded) until enough have piled up to be worth a compaction,
                # which copies the kernels of the rest.
                frozen.append((idx[done], wu[done], wv[done], wkv[done], wktu[done]))
                n_live -= n_done
                if n_live == 0:
                    break
                live = live & ~done
                if n_live <= 3 * len(idx) // 4:
                    idx, wk, wk_t, wa, wb, wpr, wpc = (t[live] for t in (idx, wk, wk_t, wa, wb, wpr, wpc))
                    wu, wv, wkv, wktu = wu[live], wv[live], wkv[live], wktu[live]
                    live = live[live]
    if n_live:
        frozen.append((idx[live], wu[live], wv[live], wkv[live], wktu[live]) if n_live < len(idx)
                      else (idx, wu, wv, wkv, wktu))
    if whole and len(frozen) == 1:
        u, v, kv, ktu = frozen[0][1:]
    else:  # put every item's scalings back in chunk order (items that never started keep zeros)
        rows = torch.cat([f[0] for f in frozen])
        u, v, kv, ktu = (torch.zeros_like(t).index_put((rows,), torch.cat([f[j] for f in frozen]))
                         for j, t in enumerate((a, b, a, b), start=1))
    return _kernel_finish(k, a, b, u, v, kv, ktu, its)


def _kernel_finish(k: torch.Tensor, a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   kv: torch.Tensor, ktu: torch.Tensor, its: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Plan u K v and its marginal error, from kv = K v and ktu = K^T u of these u, v (as the loop's test)."""
    plan = u[:, :, None] * k * v[:, None, :]  # padding: K = 0 (u, v finite), exactly zero
    row_err = (u * kv - a).abs().amax(dim=-1)
    col_err = (v * ktu - b).abs().amax(dim=-1)
    return plan, torch.maximum(row_err, col_err), its


def _vec_mat(x: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """x [C, S] times mat [C, S, R] -> [C, R] (batched row vector x matrix)."""
    return torch.bmm(x[:, None, :], mat)[:, 0, :]
