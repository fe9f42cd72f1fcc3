"""Property tests for the batched log-domain Sinkhorn solver (POT / geomloss style, always asserted), in both modes:
early stopping (the served reranker) and a fixed number of iterations (the OT-MEL teacher)."""

from __future__ import annotations

import math

import pytest
import torch

from models.sinkhorn import (
    OTProblem,
    OTResult,
    solve,
    transport_cost,
    uniform_marginals,
)

EPS_GRID = [0.005, 0.01, 0.02, 0.05, 0.1]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, N, d], [B, M, d] -> [B, N, M] cost 1 - cos in [0, 2] (what the reranker passes)."""
    x = torch.nn.functional.normalize(x, dim=-1)
    y = torch.nn.functional.normalize(y, dim=-1)
    return 1.0 - x @ y.transpose(-1, -2)


def _random_marginals(bsz: int, n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Non-uniform positive marginals (harder than uniform), each row summing to 1."""
    w = torch.rand(bsz, n, generator=gen, dtype=torch.float64) + 0.2
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def _random_problem(
    bsz: int, n: int, m: int, eps: float, seed: int = 0, dtype: torch.dtype = torch.float32, d: int = 16
) -> OTProblem:
    gen = _gen(seed)
    cost = _cosine_cost(torch.randn(bsz, n, d, generator=gen), torch.randn(bsz, m, d, generator=gen)).to(dtype)
    return OTProblem(cost, _random_marginals(bsz, n, gen, dtype), _random_marginals(bsz, m, gen, dtype), eps)


def _assert_marginals(result: OTResult, problem: OTProblem, atol: float = 1e-4) -> None:
    torch.testing.assert_close(result.plan.sum(-1), problem.a, atol=atol, rtol=0)
    torch.testing.assert_close(result.plan.sum(-2), problem.b, atol=atol, rtol=0)


def _assert_all_finite(result: OTResult) -> None:
    assert torch.isfinite(result.plan).all()
    assert torch.isfinite(result.marginal_error).all()
    assert (result.plan >= 0).all()


# --------------------------------------------------------------------------------------------------
# Marginals
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 17, 29), (3, 29, 17), (5, 1, 1), (2, 1, 9), (3, 9, 1), (6, 8, 8)])
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_marginals_hold(shape: tuple[int, int, int], eps: float) -> None:
    problem = _random_problem(*shape, eps=eps, seed=sum(shape))
    result = solve(problem, max_iter=1000, tol=1e-5)
    assert result.converged.all()
    _assert_marginals(result, problem)
    assert result.plan.shape == problem.cost.shape


def test_one_by_one_plan_is_the_mass() -> None:
    problem = OTProblem(torch.tensor([[[3.7]]]), torch.ones(1, 1), torch.ones(1, 1), 0.005)
    result = solve(problem)
    torch.testing.assert_close(result.plan, torch.ones(1, 1, 1), atol=1e-6, rtol=0)
    assert result.converged.item()


def _random_cases(count: int, seed: int) -> list[tuple[int, int, int, float, int]]:
    """Seeded random (B, N, M, eps, seed) cases: shape coverage without a hypothesis dependency."""
    gen = _gen(seed)
    cases = []
    for k in range(count):
        bsz, n, m = (int(v) for v in torch.randint(1, 25, (3,), generator=gen))
        eps = [0.02, 0.05, 0.1][k % 3]
        cases.append((1 + bsz % 4, n, m, eps, k))
    return cases


@pytest.mark.parametrize(("bsz", "n", "m", "eps", "seed"), _random_cases(25, seed=2024))
def test_marginals_hold_random_shapes(bsz: int, n: int, m: int, eps: float, seed: int) -> None:
    problem = _random_problem(bsz, n, m, eps=eps, seed=seed)
    result = solve(problem, max_iter=2000, tol=1e-5)
    _assert_all_finite(result)
    assert result.converged.all()
    _assert_marginals(result, problem)


def test_matches_reference_kernel_sinkhorn_fp64() -> None:
    """Independent check: plain (non-log) Sinkhorn in fp64 at a moderate eps, where it is safe."""
    problem = _random_problem(3, 7, 11, eps=0.1, seed=5, dtype=torch.float64)
    kernel = torch.exp(-problem.cost / problem.eps)
    v = torch.ones_like(problem.b)
    for _ in range(5000):
        u = problem.a / (kernel @ v[..., None])[..., 0]
        v = problem.b / (kernel.transpose(-1, -2) @ u[..., None])[..., 0]
    reference = u[..., :, None] * kernel * v[..., None, :]
    result = solve(problem, max_iter=5000, tol=1e-12)
    torch.testing.assert_close(result.plan, reference, atol=1e-10, rtol=1e-8)


# --------------------------------------------------------------------------------------------------
# Planted permutation at low eps
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.005, 0.01])
def test_planted_permutation_recovered(eps: float) -> None:
    gen = _gen(11)
    bsz, n, d = 4, 32, 64
    x = torch.nn.functional.normalize(torch.randn(bsz, n, d, generator=gen), dim=-1)
    perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(bsz)])  # [B, N]
    y = torch.empty_like(x)
    for i in range(bsz):
        y[i, perms[i]] = x[i]  # y[perm[k]] = x[k]: row k's partner is column perm[k]
    cost = 1.0 - x @ y.transpose(-1, -2)
    mask = torch.ones(bsz, n, dtype=torch.bool)
    problem = OTProblem(cost, uniform_marginals(mask), uniform_marginals(mask), eps)
    result = solve(problem, max_iter=200)
    _assert_all_finite(result)
    assert torch.equal(result.plan.argmax(-1), perms)
    assert torch.equal(result.plan.argmax(-2), torch.argsort(perms, dim=-1))
    # Near-permutation: almost all of each row's mass sits on the planted partner.
    assert (result.plan.amax(-1) > 0.9 / n).all()
    # The OT cost approaches the assignment cost (0) at low eps.
    assert (result.cost(problem) < 0.05).all()


# --------------------------------------------------------------------------------------------------
# No NaN / Inf, degenerate inputs
# --------------------------------------------------------------------------------------------------


def _degenerate_cases(eps: float) -> dict[str, OTProblem]:
    gen = _gen(3)
    bsz, n, m = 3, 12, 9
    a = _random_marginals(bsz, n, gen, torch.float32)
    b = _random_marginals(bsz, m, gen, torch.float32)
    return {
        "random": _random_problem(bsz, n, m, eps=eps, seed=1),
        "all_equal_cost": OTProblem(torch.full((bsz, n, m), 0.7), a, b, eps),
        "huge_cost": OTProblem(1e4 * torch.rand(bsz, n, m, generator=gen), a, b, eps),
        "huge_constant_cost": OTProblem(torch.full((bsz, n, m), 1e4), a, b, eps),
        "one_by_one": OTProblem(torch.full((bsz, 1, 1), 2.0), torch.ones(bsz, 1), torch.ones(bsz, 1), eps),
        "all_padding_item": OTProblem(
            torch.rand(bsz, n, m, generator=gen),
            torch.cat([a[:2], torch.zeros(1, n)]),
            torch.cat([b[:2], torch.zeros(1, m)]),
            eps,
        ),
    }


@pytest.mark.parametrize("eps", EPS_GRID)
@pytest.mark.parametrize(
    "case", ["random", "all_equal_cost", "huge_cost", "huge_constant_cost", "one_by_one", "all_padding_item"]
)
def test_no_nan_or_inf(eps: float, case: str) -> None:
    problem = _degenerate_cases(eps)[case]
    result = solve(problem)
    _assert_all_finite(result)
    assert torch.isfinite(result.cost(problem)).all()
    if case in ("all_equal_cost", "huge_constant_cost", "one_by_one"):
        # A constant cost carries no preference: the plan is the independent coupling a b^T.
        torch.testing.assert_close(result.plan, problem.a[:, :, None] * problem.b[:, None, :], atol=1e-6, rtol=0)
        assert result.converged.all()
    if case == "all_padding_item":
        assert torch.equal(result.plan[2], torch.zeros_like(result.plan[2]))
        assert result.converged[2].item()
        assert result.marginal_error[2].item() == 0.0
        _assert_marginals(solve(problem, max_iter=5000, tol=1e-6), problem)
    if case == "random":
        _assert_marginals(solve(problem, max_iter=5000, tol=1e-6), problem)


def test_whole_batch_padding_gives_zero_plan() -> None:
    problem = OTProblem(torch.rand(2, 5, 4), torch.zeros(2, 5), torch.zeros(2, 4), 0.05)
    result = solve(problem)
    assert torch.equal(result.plan, torch.zeros(2, 5, 4))
    assert result.converged.all()
    assert result.iterations == 0


# --------------------------------------------------------------------------------------------------
# Zero-mass padding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scatter", [False, True], ids=["padding_at_end", "padding_scattered"])
@pytest.mark.parametrize("eps", [0.01, 0.05])
def test_zero_mass_padding_is_inert(scatter: bool, eps: float) -> None:
    gen = _gen(17)
    n, m, n_pad, m_pad = 6, 7, 10, 12
    real = _random_problem(1, n, m, eps=eps, seed=23)
    # Junk on the padding, including values that would poison any arithmetic touching them.
    junk = torch.tensor([float("inf"), float("nan"), -float("inf"), 1e6, -5.0])
    cost = junk[torch.randint(0, len(junk), (1, n_pad, m_pad), generator=gen)]
    rows = torch.randperm(n_pad, generator=gen)[:n].sort().values if scatter else torch.arange(n)
    cols = torch.randperm(m_pad, generator=gen)[:m].sort().values if scatter else torch.arange(m)
    cost[0, rows[:, None], cols[None, :]] = real.cost[0]
    a = torch.zeros(1, n_pad)
    a[0, rows] = real.a[0]
    b = torch.zeros(1, m_pad)
    b[0, cols] = real.b[0]
    padded = OTProblem(cost, a, b, eps)

    ref = solve(real, max_iter=300)
    out = solve(padded, max_iter=300)
    _assert_all_finite(out)
    torch.testing.assert_close(out.plan[0, rows[:, None], cols[None, :]], ref.plan[0], atol=1e-6, rtol=1e-5)
    on_real = torch.zeros(1, n_pad, m_pad, dtype=torch.bool)
    on_real[0, rows[:, None], cols[None, :]] = True
    assert torch.equal(out.plan[~on_real], torch.zeros(int((~on_real).sum())))  # exactly zero
    assert torch.equal(out.converged, ref.converged)
    assert out.iterations == ref.iterations
    torch.testing.assert_close(out.marginal_error, ref.marginal_error, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.cost(padded), ref.cost(real), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Independence from batch neighbours and chunking
# --------------------------------------------------------------------------------------------------


def test_same_result_alone_or_in_a_batch() -> None:
    n, m, eps = 9, 13, 0.02
    target = _random_problem(1, n, m, eps=eps, seed=101)
    # Neighbours that converge at very different iterations: a constant (1 iteration), random,
    # and sharper costs (many iterations), so chunk-wide early stopping would show up.
    easy = OTProblem(
        torch.full((1, n, m), 0.3),
        uniform_marginals(torch.ones(1, n, dtype=torch.bool)),
        uniform_marginals(torch.ones(1, m, dtype=torch.bool)),
        eps,
    )
    others = [_random_problem(1, n, m, eps=eps, seed=s) for s in (102, 103)]
    sharp = [_random_problem(1, n, m, eps=eps, seed=s) for s in (104, 105)]
    sharp = [OTProblem(4.0 * p.cost, p.a, p.b, eps) for p in sharp]
    members = [easy, others[0], target, sharp[0], others[1], sharp[1]]
    batch = OTProblem(
        torch.cat([p.cost for p in members]), torch.cat([p.a for p in members]), torch.cat([p.b for p in members]), eps
    )
    idx = 2  # position of target in members

    for max_iter, tol in [(200, 1e-4), (200, 1e-6), (7, 1e-6)]:
        alone = solve(target, max_iter=max_iter, tol=tol)
        for chunk_size in (None, 1, 2, 4, 256):
            together = solve(batch, max_iter=max_iter, tol=tol, chunk_size=chunk_size)
            torch.testing.assert_close(together.plan[idx], alone.plan[0], atol=1e-5, rtol=0)
            assert together.converged[idx] == alone.converged[0]
            torch.testing.assert_close(together.marginal_error[idx], alone.marginal_error[0], atol=1e-6, rtol=0)
            # Every member equals its own solo solve too.
            for j, member in enumerate(members):
                torch.testing.assert_close(
                    together.plan[j], solve(member, max_iter=max_iter, tol=tol).plan[0], atol=1e-5, rtol=0
                )


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64, None])
def test_chunk_size_does_not_change_results(chunk_size: int | None) -> None:
    problem = _random_problem(10, 11, 7, eps=0.01, seed=7)
    ref = solve(problem, chunk_size=None, max_iter=100)
    out = solve(problem, chunk_size=chunk_size, max_iter=100)
    torch.testing.assert_close(out.plan, ref.plan, atol=1e-5, rtol=0)
    assert torch.equal(out.converged, ref.converged)
    assert out.iterations == ref.iterations  # max over chunks == the slowest item either way


# --------------------------------------------------------------------------------------------------
# dtype and device
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_kept(dtype: torch.dtype) -> None:
    problem = _random_problem(3, 5, 6, eps=0.05, seed=2, dtype=dtype)
    result = solve(problem)
    assert result.plan.dtype == dtype
    assert result.plan.device == problem.cost.device
    assert result.converged.dtype == torch.bool
    assert result.converged.shape == (3,)
    assert result.marginal_error.dtype == dtype
    assert result.marginal_error.shape == (3,)
    assert result.cost(problem).dtype == dtype
    assert isinstance(result.iterations, int)
    _assert_marginals(result, problem)


def test_half_precision_input_returns_half_plan() -> None:
    problem = _random_problem(2, 5, 6, eps=0.05, seed=2, dtype=torch.float16)
    result = solve(problem)
    assert result.plan.dtype == torch.float16
    _assert_all_finite(result)
    assert result.converged.all()  # measured in fp32 before the cast back


def test_works_under_no_grad_and_with_grad() -> None:
    problem = _random_problem(2, 4, 5, eps=0.1, seed=9, dtype=torch.float64)
    with torch.no_grad():
        plain = solve(problem)
    assert not plain.plan.requires_grad
    cost = problem.cost.clone().requires_grad_(True)
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)  # with padding

    def plan_of(c: torch.Tensor) -> torch.Tensor:
        return solve(OTProblem(c, a, problem.b, 0.1), max_iter=4, tol=0.0).plan

    assert torch.autograd.gradcheck(plan_of, (cost,))
    out = solve(OTProblem(cost, a, problem.b, 0.1))
    out.cost(OTProblem(cost, a, problem.b, 0.1)).sum().backward()
    assert cost.grad is not None and torch.isfinite(cost.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_kept_and_matches_cpu() -> None:
    problem = _random_problem(6, 17, 29, eps=0.01, seed=4)
    cpu = solve(problem, max_iter=300)
    dev = torch.device("cuda")
    on_gpu = OTProblem(problem.cost.to(dev), problem.a.to(dev), problem.b.to(dev), problem.eps)
    gpu = solve(on_gpu, max_iter=300)
    assert gpu.plan.device.type == "cuda"
    assert gpu.converged.device.type == "cuda"
    assert gpu.marginal_error.device.type == "cuda"
    assert gpu.plan.dtype == torch.float32
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, atol=1e-5, rtol=0)
    assert torch.equal(gpu.converged.cpu(), cpu.converged)


# --------------------------------------------------------------------------------------------------
# converged / iterations / marginal_error
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("max_iter", [0, 1, 5, 50])
def test_convergence_report_is_consistent(tol: float, max_iter: int) -> None:
    problem = _random_problem(6, 10, 12, eps=0.01, seed=31)
    result = solve(problem, max_iter=max_iter, tol=tol, chunk_size=4)
    assert isinstance(result.iterations, int)
    assert 0 <= result.iterations <= max_iter
    assert torch.equal(result.converged, result.marginal_error <= tol)
    # marginal_error is the error of the returned plan, rows and columns.
    row_err = (result.plan.sum(-1) - problem.a).abs().amax(-1)
    col_err = (result.plan.sum(-2) - problem.b).abs().amax(-1)
    torch.testing.assert_close(result.marginal_error, torch.maximum(row_err, col_err), atol=1e-6, rtol=0)
    if result.iterations < max_iter:  # stopped early, so every item must have converged
        assert result.converged.all()


def test_one_iteration_on_a_hard_problem_is_not_converged() -> None:
    problem = _random_problem(4, 20, 20, eps=0.005, seed=13)
    result = solve(problem, max_iter=1, tol=1e-4)
    assert result.iterations == 1
    assert not result.converged.any()
    assert (result.marginal_error > 1e-4).all()


def test_eps_005_on_81x81_cosine_costs_converges_within_50_iterations() -> None:
    gen = _gen(0)
    bsz, n, d = 16, 81, 96
    cost = _cosine_cost(torch.randn(bsz, n, d, generator=gen), torch.randn(bsz, n, d, generator=gen))
    mask = torch.ones(bsz, n, dtype=torch.bool)
    problem = OTProblem(cost, uniform_marginals(mask), uniform_marginals(mask), 0.05)
    result = solve(problem, max_iter=50, tol=1e-4)
    assert result.converged.all()
    assert result.iterations < 50  # stopped early (design.md: about 20)
    _assert_marginals(result, problem)


# --------------------------------------------------------------------------------------------------
# Helpers and validation
# --------------------------------------------------------------------------------------------------


def test_uniform_marginals() -> None:
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, True, True]])
    w = uniform_marginals(mask)
    expected = torch.tensor([[1 / 3, 0, 1 / 3, 1 / 3], [0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(w, expected)
    assert not torch.isnan(w).any()
    assert uniform_marginals(mask, dtype=torch.float64).dtype == torch.float64


def test_transport_cost_matches_definition_and_ignores_padding_cost() -> None:
    problem = _random_problem(3, 5, 4, eps=0.05, seed=8)
    result = solve(problem)
    torch.testing.assert_close(result.cost(problem), (result.plan * problem.cost).sum((-1, -2)))
    plan = torch.tensor([[[0.5, 0.0], [0.0, 0.5]]])
    cost = torch.tensor([[[1.0, float("inf")], [float("nan"), 3.0]]])
    torch.testing.assert_close(transport_cost(plan, cost), torch.tensor([2.0]))


@pytest.mark.parametrize(
    ("cost_shape", "a_shape", "b_shape", "eps"),
    [
        ((2, 3), (2, 3), (2, 3), 0.1),  # cost not 3-D
        ((2, 3, 4), (2, 4), (2, 4), 0.1),  # a mismatched
        ((2, 3, 4), (2, 3), (2, 3), 0.1),  # b mismatched
        ((2, 3, 4), (2, 3), (2, 4), 0.0),  # eps not > 0
        ((2, 3, 4), (2, 3), (2, 4), -1.0),
        ((2, 3, 4), (2, 3), (2, 4), math.inf),
    ],
)
def test_problem_validation(cost_shape, a_shape, b_shape, eps) -> None:
    with pytest.raises(ValueError):
        OTProblem(torch.rand(cost_shape), torch.rand(a_shape), torch.rand(b_shape), eps)


def test_solver_argument_validation() -> None:
    problem = _random_problem(1, 2, 2, eps=0.1)
    with pytest.raises(ValueError):
        solve(problem, chunk_size=0)
    with pytest.raises(ValueError):
        solve(problem, max_iter=-1)
    with pytest.raises(ValueError):
        solve(problem, tol=-1.0)


# --------------------------------------------------------------------------------------------------
# Fixed iterations (early_stop=False): the teacher's mode
# --------------------------------------------------------------------------------------------------


def _plain_log_sinkhorn(problem: OTProblem, iters: int) -> torch.Tensor:
    """Reference: the plain log-domain iteration from (0, 0) on the unshifted cost, fp64, no early stop."""
    log_k = -problem.cost.double() / problem.eps
    log_a, log_b = problem.a.double().log(), problem.b.double().log()
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iters):
        u = log_a - torch.logsumexp(log_k + v[:, None, :], dim=-1)
        v = log_b - torch.logsumexp(log_k + u[:, :, None], dim=-2)
    return torch.exp(u[:, :, None] + log_k + v[:, None, :])


@pytest.mark.parametrize("iters", [0, 1, 3, 10])
@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_fixed_iterations_give_the_plain_iterations_plan(iters: int, offset: float) -> None:
    """Unconverged plans after a fixed count equal the textbook iteration's, despite the solver's row and column
    shifts (`offset` adds per-row and per-column constants to the cost, which the shifts remove)."""
    problem = _random_problem(4, 9, 6, eps=0.05, seed=41, dtype=torch.float64)
    gen = _gen(42)
    cost = problem.cost + offset * (torch.rand(4, 9, 1, generator=gen, dtype=torch.float64)
                                    + torch.rand(4, 1, 6, generator=gen, dtype=torch.float64))
    problem = OTProblem(cost, problem.a, problem.b, problem.eps)
    result = solve(problem, max_iter=iters, tol=1e-4, early_stop=False)
    torch.testing.assert_close(result.plan, _plain_log_sinkhorn(problem, iters), atol=1e-10, rtol=1e-8)
    assert result.iterations == iters


def test_fixed_iterations_ignore_tol_and_still_report_convergence() -> None:
    problem = _random_problem(5, 10, 12, eps=0.05, seed=43)
    early = solve(problem, max_iter=200, tol=1e-2)
    fixed = solve(problem, max_iter=200, tol=1e-2, early_stop=False)
    assert early.iterations < 200 and fixed.iterations == 200  # tol stops one mode, not the other
    assert torch.equal(fixed.converged, fixed.marginal_error <= 1e-2) and fixed.converged.all()
    assert (fixed.marginal_error < early.marginal_error).all()  # the extra iterations went on converging
    short = solve(problem, max_iter=2, tol=1e-6, early_stop=False)
    assert short.iterations == 2 and not short.converged.any()
    row_err = (short.plan.sum(-1) - problem.a).abs().amax(-1)
    col_err = (short.plan.sum(-2) - problem.b).abs().amax(-1)
    torch.testing.assert_close(short.marginal_error, torch.maximum(row_err, col_err), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_fixed_iterations_independent_of_chunks_neighbours_and_padding(chunk_size: int | None) -> None:
    problem = _random_problem(6, 8, 7, eps=0.05, seed=44)
    a, b = problem.a.clone(), problem.b.clone()
    a[0, 5:] = 0.0  # padding rows and columns, renormalised
    b[1, 4:] = 0.0
    a[2] = 0.0  # an item without mass
    a, b = a / a.sum(-1, keepdim=True).clamp(min=1e-30), b / b.sum(-1, keepdim=True)
    cost = problem.cost.clone()
    cost[0, 5:] = float("nan")  # padding cost is ignored
    problem = OTProblem(cost, a, b, problem.eps)
    whole = solve(problem, max_iter=10, early_stop=False, chunk_size=chunk_size)
    assert torch.isfinite(whole.plan).all() and whole.iterations == 10
    assert torch.all(whole.plan[2] == 0) and torch.all(whole.plan[0, 5:] == 0) and torch.all(whole.plan[1, :, 4:] == 0)
    for i in (0, 1, 3):
        alone = solve(OTProblem(cost[i:i + 1], a[i:i + 1], b[i:i + 1], problem.eps), max_iter=10, early_stop=False)
        torch.testing.assert_close(whole.plan[i], alone.plan[0], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# Domains: the kernel (standard) domain gives the log domain's plan; "auto" picks per problem
# --------------------------------------------------------------------------------------------------


def _cosine_problem(bsz: int, n: int, m: int, eps: float, seed: int, pad: bool = True) -> OTProblem:
    """The reranker's problems: cost 1 - cos, uniform marginals over real tokens, padded tails of random length."""
    gen = _gen(seed)
    cost = _cosine_cost(torch.randn(bsz, n, 16, generator=gen), torch.randn(bsz, m, 16, generator=gen))
    rows = torch.arange(n)[None] < torch.randint(1, n + 1, (bsz, 1), generator=gen) if pad else torch.ones(bsz, n) > 0
    cols = torch.arange(m)[None] < torch.randint(1, m + 1, (bsz, 1), generator=gen) if pad else torch.ones(bsz, m) > 0
    return OTProblem(cost, uniform_marginals(rows), uniform_marginals(cols), eps)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("check_every", [1, 3])
def test_kernel_domain_gives_the_log_domains_plan(eps: float, check_every: int) -> None:
    problem = _cosine_problem(40, 32, 39, eps, seed=51)
    log = solve(problem, max_iter=300, tol=1e-6, domain="log", check_every=check_every)
    ker = solve(problem, max_iter=300, tol=1e-6, domain="kernel", check_every=check_every)
    _assert_all_finite(ker)
    assert ker.converged.all() and log.converged.all()
    torch.testing.assert_close(ker.plan, log.plan, atol=2e-6, rtol=0)
    _assert_marginals(ker, problem, atol=2e-6)
    # The kernel domain starts from the potentials (0, 0) of the problem as given, the log domain from those of its
    # row/column-shifted copy: other iterates, about as many of them.
    assert abs(ker.iterations - log.iterations) <= max(check_every, 0.1 * log.iterations)


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_kernel_domain_fixed_iterations_give_the_plain_iterations_plan(iters: int) -> None:
    problem = _random_problem(4, 9, 6, eps=0.05, seed=41, dtype=torch.float64)
    gen = _gen(42)
    cost = problem.cost + 3.0 * (torch.rand(4, 9, 1, generator=gen, dtype=torch.float64)
                                 + torch.rand(4, 1, 6, generator=gen, dtype=torch.float64))
    problem = OTProblem(cost, problem.a, problem.b, problem.eps)
    result = solve(problem, max_iter=iters, early_stop=False, domain="kernel")
    torch.testing.assert_close(result.plan, _plain_log_sinkhorn(problem, iters), atol=1e-10, rtol=1e-8)
    assert result.iterations == iters


@pytest.mark.parametrize("domain", ["kernel", "auto"])
@pytest.mark.parametrize("check_every", [1, 4])
def test_kernel_domain_independent_of_neighbours_and_chunks(domain: str, check_every: int) -> None:
    """Frozen items leave the kernel domain's working set: what stays behind must not change them. Neighbours
    that converge at very different iterations, and (auto) neighbours that go to the log domain."""
    eps = 0.05
    target = _cosine_problem(1, 9, 13, eps, seed=61, pad=False)
    easy = OTProblem(torch.full((1, 9, 13), 0.3), target.a, target.b, eps)
    others = [_cosine_problem(1, 9, 13, eps, seed=s) for s in (62, 63)]
    sharp = OTProblem(0.7 * target.cost.flip(1), target.a, target.b, eps)  # span > 1: slow, still kernel-safe
    # Log domain under auto (span / eps = 400 / 0.05): a cost scaled far beyond the kernel's range.
    wide = OTProblem(20.0 * _cosine_problem(1, 9, 13, eps, seed=64, pad=False).cost, target.a, target.b, eps)
    members = [easy, others[0], target, sharp, others[1], wide]
    batch = OTProblem(*(torch.cat([getattr(p, f) for p in members]) for f in ("cost", "a", "b")), eps)
    if domain == "kernel":
        members, batch = members[:-1], OTProblem(batch.cost[:-1], batch.a[:-1], batch.b[:-1], eps)
    for max_iter, tol in [(200, 1e-4), (200, 1e-6), (7, 1e-6)]:
        kw = {"max_iter": max_iter, "tol": tol, "domain": domain, "check_every": check_every}
        for chunk_size in (None, 1, 2, 4):
            together = solve(batch, chunk_size=chunk_size, **kw)
            for j, member in enumerate(members):
                alone = solve(member, **kw)
                torch.testing.assert_close(together.plan[j], alone.plan[0], atol=1e-6, rtol=0)
                assert together.converged[j] == alone.converged[0]
                torch.testing.assert_close(together.marginal_error[j], alone.marginal_error[0], atol=1e-7, rtol=0)


@pytest.mark.parametrize("scatter", [False, True], ids=["padding_at_end", "padding_scattered"])
def test_kernel_domain_padding_is_inert(scatter: bool) -> None:
    gen = _gen(17)
    n, m, n_pad, m_pad, eps = 6, 7, 10, 12, 0.05
    real = _random_problem(1, n, m, eps=eps, seed=23)
    junk = torch.tensor([float("inf"), float("nan"), -float("inf"), 1e6, -5.0])
    cost = junk[torch.randint(0, len(junk), (1, n_pad, m_pad), generator=gen)]
    rows = torch.randperm(n_pad, generator=gen)[:n].sort().values if scatter else torch.arange(n)
    cols = torch.randperm(m_pad, generator=gen)[:m].sort().values if scatter else torch.arange(m)
    cost[0, rows[:, None], cols[None, :]] = real.cost[0]
    a, b = torch.zeros(1, n_pad), torch.zeros(1, m_pad)
    a[0, rows], b[0, cols] = real.a[0], real.b[0]
    out = solve(OTProblem(cost, a, b, eps), max_iter=300, domain="kernel")
    ref = solve(real, max_iter=300, domain="kernel")
    _assert_all_finite(out)
    torch.testing.assert_close(out.plan[0, rows[:, None], cols[None, :]], ref.plan[0], atol=1e-6, rtol=1e-5)
    on_real = torch.zeros(1, n_pad, m_pad, dtype=torch.bool)
    on_real[0, rows[:, None], cols[None, :]] = True
    assert torch.equal(out.plan[~on_real], torch.zeros(int((~on_real).sum())))
    assert out.iterations == ref.iterations and torch.equal(out.converged, ref.converged)


def test_kernel_safe_and_auto_choice() -> None:
    from models.sinkhorn import KERNEL_SPAN, kernel_safe

    p = _cosine_problem(6, 8, 9, 0.05, seed=71)
    assert kernel_safe(p.cost, p.a, p.b, 0.05).all()  # span <= 2: 2 / 0.05 = 40 <= 50
    full = _cosine_problem(6, 32, 39, 0.05, seed=72, pad=False)  # spans well above 50 * 0.01
    assert not kernel_safe(full.cost, full.a, full.b, 0.01).any()
    assert kernel_safe(full.cost.double(), full.a.double(), full.b.double(), 0.01).all()  # fp64's range is wider
    assert KERNEL_SPAN[torch.float32] * 0.05 >= 2.0  # the reranker's costs at its eps
    cost = p.cost.clone()
    cost[0, 0, 0] = float("inf")  # an infinite real cost: log domain
    cost[1][p.a[1] == 0] = 1e9  # huge cost on padding only: ignored
    safe = kernel_safe(cost, p.a, p.b, 0.05)
    assert not safe[0] and safe[1:].all()
    # Auto equals the log domain at low eps (every problem there) and the kernel domain where safe.
    for eps in (0.005, 0.05):
        q = OTProblem(p.cost, p.a, p.b, eps)
        auto, log = solve(q, max_iter=500), solve(q, max_iter=500, domain="log")
        torch.testing.assert_close(auto.plan, log.plan, atol=1e-5, rtol=0)
    q = OTProblem(p.cost, p.a, p.b, 0.05)
    torch.testing.assert_close(solve(q, backend="torch").plan, solve(q, domain="kernel").plan, atol=0, rtol=0)
    torch.testing.assert_close(solve(q).plan, solve(q, domain="kernel").plan, atol=1e-7, rtol=0)  # numba: rounding


def test_kernel_domain_gradients() -> None:
    problem = _random_problem(2, 4, 5, eps=0.1, seed=9, dtype=torch.float64)
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)  # with padding

    def plan_of(c: torch.Tensor) -> torch.Tensor:
        return solve(OTProblem(c, a, problem.b, 0.1), max_iter=4, tol=0.0, domain="kernel").plan

    assert torch.autograd.gradcheck(plan_of, (problem.cost.clone().requires_grad_(True),))


def test_domain_and_check_every_validation() -> None:
    problem = _random_problem(1, 2, 2, eps=0.1)
    with pytest.raises(ValueError):
        solve(problem, domain="exp")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        solve(problem, check_every=0)


# --------------------------------------------------------------------------------------------------
# Backends: the compiled kernel domain (numba) gives the torch solver's results, problem by problem
# --------------------------------------------------------------------------------------------------

needs_numba = pytest.mark.skipif(not __import__("models.sinkhorn_numba").sinkhorn_numba.AVAILABLE,
                                 reason="numba is not installed")


def _mixed_batch(eps: float) -> OTProblem:
    """Reranker-like problems with scattered padding holding junk, one without mass, one without columns, one with
    an infinite real cost and one too wide for the kernel (both: log domain under auto), in one batch."""
    p = _cosine_problem(12, 15, 39, eps, seed=91)
    cost, a, b = p.cost.clone(), p.a.clone(), p.b.clone()
    cost[0][a[0] == 0] = float("nan")  # junk on padding rows: ignored
    a[3] = 0.0  # no mass at all: zero plan
    b[4] = 0.0  # rows without columns
    cost[5, 0, 0] = float("inf")  # an infinite real cost: log domain
    cost[6] = 30.0 * cost[6]  # span / eps far beyond 50: log domain
    return OTProblem(cost, a, b, eps)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("max_iter", "tol", "check_every"), [(50, 1e-4, 3), (300, 1e-6, 1), (7, 1e-6, 2)])
def test_numba_backend_gives_the_torch_backends_results(dtype: torch.dtype, max_iter: int, tol: float,
                                                        check_every: int) -> None:
    p = _mixed_batch(0.05)
    p = OTProblem(p.cost.to(dtype), p.a.to(dtype), p.b.to(dtype), p.eps)
    kw = {"max_iter": max_iter, "tol": tol, "check_every": check_every}
    ref, out = solve(p, backend="torch", **kw), solve(p, backend="numba", **kw)
    assert out.plan.dtype == dtype and out.marginal_error.dtype == dtype
    torch.testing.assert_close(out.plan, ref.plan, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)
    torch.testing.assert_close(out.marginal_error, ref.marginal_error, atol=1e-6, rtol=0)
    assert torch.equal(out.converged, ref.converged) and out.iterations == ref.iterations
    assert torch.isfinite(out.plan).all() and torch.all(out.plan[3] == 0) and torch.all(out.plan[4] == 0)


@needs_numba
@pytest.mark.parametrize("iters", [1, 3, 10])
def test_numba_backend_fixed_iterations_give_the_plain_iterations_plan(iters: int) -> None:
    """OT-MEL's fixed count (the teacher's assignment) through the compiled solver."""
    problem = _random_problem(4, 9, 6, eps=0.05, seed=41, dtype=torch.float64)
    out = solve(problem, max_iter=iters, early_stop=False, backend="numba")
    torch.testing.assert_close(out.plan, _plain_log_sinkhorn(problem, iters), atol=1e-10, rtol=1e-8)
    assert out.iterations == iters


@needs_numba
def test_numba_backend_result_is_the_problems_alone() -> None:
    """Each problem runs alone in the compiled loop: bitwise the same in any batch, at any position."""
    p = _mixed_batch(0.05)
    together = solve(p, backend="numba", max_iter=50, tol=1e-4, check_every=3)
    order = torch.randperm(12, generator=_gen(5))
    shuffled = solve(OTProblem(p.cost[order], p.a[order], p.b[order], p.eps), backend="numba", max_iter=50, tol=1e-4,
                     check_every=3)
    assert torch.equal(shuffled.plan, together.plan[order])
    for i in (0, 1, 2, 7):  # kernel-domain members (5 and 6 go to the log domain, batched in torch)
        alone = solve(OTProblem(p.cost[i:i + 1], p.a[i:i + 1], p.b[i:i + 1], p.eps), backend="numba", max_iter=50,
                      tol=1e-4, check_every=3)
        assert torch.equal(alone.plan[0], together.plan[i])


@needs_numba
def test_backend_choice() -> None:
    p = _random_problem(3, 5, 6, eps=0.05, seed=3)
    with pytest.raises(ValueError):
        solve(p, backend="cuda")  # type: ignore[arg-type]
    cost = p.cost.clone().requires_grad_(True)  # a gradient is wanted: the torch solver, whatever the backend says
    out = solve(OTProblem(cost, p.a, p.b, p.eps), backend="numba")
    assert out.plan.requires_grad
    with torch.no_grad():
        assert not solve(OTProblem(cost, p.a, p.b, p.eps), backend="numba").plan.requires_grad
    half = solve(OTProblem(p.cost.half(), p.a.half(), p.b.half(), p.eps), backend="numba")
    assert half.plan.dtype == torch.float16
