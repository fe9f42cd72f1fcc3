"""Batched, log-domain entropic optimal transport (Sinkhorn-Knopp) in pure torch: the one solver of the project,
used by the served reranker (service/pipeline/rerank.py, early stopping) and by the OT-MEL teacher
(models/otmel.py, a fixed number of iterations). It lives in models/ because models/ may not import service/.

Problem, solver and result are separate (ott-jax style): build an :class:`OTProblem`, call
:func:`solve`, read the :class:`OTResult`. The result always carries ``converged``, the iteration
count and the marginal error, so callers feed them to metrics instead of relying on warnings.

Conventions
- Shapes: ``cost`` [B, N, M], ``a`` [B, N], ``b`` [B, M]. Zero-mass entries of ``a``/``b`` are padding:
  their rows/columns of the plan are exactly zero and their cost values are ignored (even inf/NaN).
- The cost is never rescaled, so ``eps`` is in the cost's units; the reranker passes ``1 - cosine``
  in [0, 2], where eps = 0.05 converges in about 20 iterations. Internally each row and column is
  shifted by its minimum, which leaves the plan unchanged (see ``_solve_chunk``) and helps fp32.
  ``OTResult.cost`` uses the cost as given.
- Log domain throughout: the standard (kernel) domain underflows in fp32 at eps <= 0.01.
- Early stopping is per problem: an item whose row-marginal error reaches ``tol`` is frozen (its
  potentials stop updating), so its result does not depend on the other problems in its batch or
  chunk, nor on ``chunk_size``. A chunk stops when all its items are frozen or at ``max_iter``.
- ``early_stop=False`` is OT-MEL's fixed-iteration Sinkhorn (the teacher's assignment): every problem with
  mass runs exactly ``max_iter`` iterations, from the potentials (0, 0) of the *unshifted* problem, so the
  plan after a given count is the plain iteration's (u <- log a - LSE(log K + v), v <- log b - LSE(log K^T + u)).
  ``tol`` then only decides ``converged`` in the report.
- fp32 and fp64 are computed in their own dtype; half precision (fp16/bf16) is computed in fp32 and
  the plan is cast back to the input dtype (``marginal_error`` is measured before that cast).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Finite stand-in for log(0) on masked (padding) entries: -inf would make logsumexp over an
# all-padding row return -inf and turn (-inf) - (-inf) into NaN (also in autograd). 1e30 dwarfs any
# realistic |cost| / eps yet leaves room for sums of a few such terms in fp32 (max ~3.4e38).
_NEG = -1e30


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
          early_stop: bool = True) -> OTResult:
    """Solve each problem of the batch with log-domain Sinkhorn.

    ``chunk_size`` problems are processed at a time (None: the whole batch at once); a small working
    set stays in cache, which is several times faster on CPU for many small problems. Results do not
    depend on ``chunk_size`` or on batch neighbours (converged items are frozen, see module doc).
    ``early_stop=False``: exactly ``max_iter`` iterations for every problem with mass (see module doc).
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")

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

    step = bsz if chunk_size is None else chunk_size
    plans, errors = [], []
    iterations = 0
    for start in range(0, bsz, step):
        stop = min(start + step, bsz)
        plan, err, its = _solve_chunk(
            cost[start:stop].to(work_dtype),
            problem.a[start:stop].to(work_dtype),
            problem.b[start:stop].to(work_dtype),
            float(problem.eps),
            max_iter,
            tol,
            early_stop,
        )
        plans.append(plan)
        errors.append(err)
        iterations = max(iterations, its)

    plan = plans[0] if len(plans) == 1 else torch.cat(plans, dim=0)
    marginal_error = errors[0] if len(errors) == 1 else torch.cat(errors, dim=0)
    converged = marginal_error <= tol
    if logger.isEnabledFor(logging.DEBUG):  # guarded: .item() would sync the device on every call
        logger.debug(
            "sinkhorn: B=%d N=%d M=%d eps=%g iterations=%d converged=%d/%d max_err=%.3g",
            bsz,
            n,
            m,
            problem.eps,
            iterations,
            int(converged.sum().item()),
            bsz,
            marginal_error.max().item(),
        )
    return OTResult(plan=plan.to(out_dtype), converged=converged, iterations=iterations, marginal_error=marginal_error)


def _solve_chunk(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int, tol: float, early_stop: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One chunk: cost [C, N, M], a [C, N], b [C, M] -> (plan [C, N, M], marginal_error [C], iterations)."""
    row_mask = a > 0  # [C, N]
    col_mask = b > 0  # [C, M]
    pair_mask = row_mask[:, :, None] & col_mask[:, None, :]  # [C, N, M]
    zero = torch.zeros((), dtype=cost.dtype, device=cost.device)

    # Shift each row, then each column, by its minimum over real entries. Under the marginal
    # constraints this adds a constant to <P, C>, so the plan and the meaning of eps are unchanged
    # (from matching starts the iterates are the same up to a change of variables of u, v, see below); it
    # only keeps the log-domain quantities near 0, where fp32 is precise (e.g. a constant cost of 1e4 at
    # eps 0.005 is exact).
    inf = torch.full((), float("inf"), dtype=cost.dtype, device=cost.device)
    real_cost = torch.where(pair_mask, cost, inf)  # padding ignored whatever its value (inf, NaN)
    row_min = real_cost.amin(dim=-1, keepdim=True)
    row_shift = torch.where(torch.isfinite(row_min), row_min, zero)  # [C, N, 1]
    real_cost = real_cost - row_shift
    col_min = real_cost.amin(dim=-2, keepdim=True)
    col_shift = torch.where(torch.isfinite(col_min), col_min, zero)  # [C, 1, M]
    real_cost = real_cost - col_shift
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
        if early_stop:
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
