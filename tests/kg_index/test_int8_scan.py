"""The int8 shortlist of exact search (kg_index/int8_scan.py, ExactSearch._int8_shortlisted): its error bound holds
on every row, and the search through it returns FAISS's rows and scores, dead rows and duplicates included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kg_index import exact
from kg_index.exact import SMALL_BATCH, ExactSearch
from kg_index.int8_scan import Int8Scores, int8_usable
from tests.kg_index.test_exact import _check_like_faiss, _flat, _near_tied, _unit, _with_duplicates

pytestmark = pytest.mark.skipif(not int8_usable(), reason="FBGEMM's int8 products are not exact on this CPU")


@pytest.fixture
def int8_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact, "_int8_mode", "on")
    monkeypatch.setattr(exact, "_coarse_mode", "off")


@pytest.mark.parametrize(("d", "scale", "shift"), [(384, 1.0, 0.0), (96, 3.0, 0.0), (40, 0.2, 0.5), (17, 1.0, -2.0)])
def test_int8_error_is_within_its_bound_on_every_row(d: int, scale: float, shift: float) -> None:
    """Unit and non-unit vectors, ranges not centred on 0, odd dimensions: |int8 score - exact score| <= bound for
    every query and row, and the bound is not vacuous (within 20x the largest error)."""
    rng = np.random.default_rng(d)
    x = torch.from_numpy(scale * _unit(rng, 3000, d) + shift)
    q = torch.from_numpy(_unit(rng, 24, d) * rng.uniform(0.5, 2.0, (24, 1)).astype(np.float32))
    kernel = Int8Scores(x)
    err = (kernel.scores(q) - q @ x.T).abs().double()
    bound = kernel.bound(q)
    assert (err <= bound[:, None]).all()
    assert bound.max() < 20 * err.max()


def test_the_saturation_check_refuses_a_kernel_that_saturates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where u8 x s8 pair sums saturate (CPUs without VNNI), the worst case misses by about half the score: the
    check at first use turns the kernel off."""
    from kg_index import int8_scan

    real = int8_scan.Int8Scores.scores
    monkeypatch.setattr(int8_scan.Int8Scores, "scores", lambda self, q: real(self, q).clamp(max=32767 / 127**2))
    assert not int8_scan.int8_usable.__wrapped__()
    monkeypatch.setattr(int8_scan.Int8Scores, "scores", real)
    assert int8_scan.int8_usable.__wrapped__()


@pytest.mark.parametrize(("n", "d", "b", "k"), [(2000, 384, 64, 32), (3000, 96, 8, 10), (1500, 40, 1, 32),
                                               (2500, 384, 2, 32), (600, 40, 12, 400)])
def test_int8_shortlist_returns_the_fp32_rows_and_scores(int8_on, n: int, d: int, b: int, k: int) -> None:
    rng = np.random.default_rng(n + d + b)
    x, q = _unit(rng, n, d), _unit(rng, b, d)
    ex = ExactSearch.for_index(_flat(x))
    _check_like_faiss(ex, x, q, k)
    room = k + exact.TIE_MARGIN + exact.INT8_EXTRA < n  # k = 400 of 600 leaves none: another kernel answers
    assert ex.int8_shortlisted == (b if room else 0)


def test_int8_shortlist_searches_again_in_fp32_where_its_bound_does_not_clear(int8_on, monkeypatch) -> None:
    """A shortlist too short for its bound (near-tied vectors, INT8_EXTRA 1): the queries are searched again in
    fp32 and the answer stays exact."""
    monkeypatch.setattr(exact, "INT8_EXTRA", 1)
    x, q = _near_tied(16)
    ex = ExactSearch.for_index(_flat(x))
    scores, rows = ex.search(q, 20)
    assert ex.int8_shortlisted == 16 and ex.fp32_researches == 16
    want_scores, want_rows = _flat(x).search(q, 20)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6, rtol=0)
    assert np.array_equal(np.sort(rows, 1), np.sort(want_rows, 1))


@pytest.mark.parametrize("batch", [1, SMALL_BATCH + 1, 16])
def test_int8_shortlist_never_returns_dead_rows(int8_on, batch: int) -> None:
    rng = np.random.default_rng(7)
    x, q = _unit(rng, 1200, 32), _unit(rng, batch, 32)
    index = _flat(x)
    _, best = index.search(q, 20)
    dead = torch.zeros(len(x), dtype=torch.bool)
    dead[torch.from_numpy(best[:, ::2].ravel())] = True  # every other of each query's best 20
    ex = ExactSearch.for_index(index)
    scores, rows = ex.search(q, 10, dead=dead)
    assert ex.int8_shortlisted == batch
    live = np.flatnonzero(~dead.numpy())
    want_scores, want_rows = _flat(x[live]).search(q, 10)
    assert not dead.numpy()[rows].any()
    assert np.array_equal(rows, live[want_rows])
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("copies", "k"), [(4, 8), (4, 40), (40, 50)])
def test_int8_shortlist_keeps_faiss_order_for_duplicates(int8_on, copies: int, k: int) -> None:
    x, q = _with_duplicates(copies, 600, 8)
    want_scores, want_rows = _flat(x).search(q, k)
    ex = ExactSearch.for_index(_flat(x))
    scores, rows = ex.search(q, k)
    assert ex.int8_shortlisted == 8
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("plan", "b", "used"), [
    (exact.SearchPlan(int8_batches=(3, 16)), 8, True), (exact.SearchPlan(int8_batches=(3, 16)), 32, False),
    (exact.SearchPlan(int8_batches=(3, 16)), 1, False), (exact.SearchPlan(small_alone="int8"), 1, True),
    (exact.SearchPlan(small_alone="int8"), 8, False), (exact.SearchPlan(), 8, False)])
def test_the_plan_decides_which_batches_take_the_int8_shortlist(monkeypatch, plan, b: int, used: bool) -> None:
    monkeypatch.setattr(exact, "_int8_mode", "auto")
    rng = np.random.default_rng(b)
    x, q = _unit(rng, 2000, 64), _unit(rng, b, 64)
    ex = ExactSearch.for_index(_flat(x))
    ex.plan = plan
    _check_like_faiss(ex, x, q, 32)
    assert ex.int8_shortlisted == (b if used else 0)
    monkeypatch.setattr(exact, "_int8_mode", "off")  # off wins over any plan
    ex.search(q, 32)
    assert ex.int8_shortlisted == (b if used else 0)


@pytest.mark.parametrize(("times", "want"), [
    ({"int8@8": 5, "fp32@8": 9, "bf16@8": 8, "int8@16": 8, "fp32@16": 11, "bf16@16": 12, "int8@32": 16,
      "fp32@32": 15, "bf16@32": 21, "int8@64": 30, "fp32@64": 24, "bf16@64": 40}, (SMALL_BATCH + 1, 16)),
    ({"int8@8": 9, "fp32@8": 8, "bf16@8": 7, "int8@16": 5, "fp32@16": 11, "bf16@16": 12}, (0, -1)),  # not at 8
    ({"int8@8": 5, "fp32@8": 9, "int8@16": 5, "fp32@16": 9, "int8@32": 5, "fp32@32": 9, "int8@64": 5,
      "fp32@64": 9}, (SMALL_BATCH + 1, 64)),
])
def test_calibration_picks_the_int8_batches_where_it_keeps_winning(times: dict, want: tuple[int, int]) -> None:
    assert exact._int8_batches({k: float(v) for k, v in times.items()}, None) == want


def test_a_bf16_time_past_its_limit_does_not_count_against_int8() -> None:
    """At 16 queries the plan would take the fp32 search (bf16 only up to 8): int8 need only beat fp32 there."""
    times = {"int8@8": 5.0, "fp32@8": 9.0, "bf16@8": 4.0, "int8@16": 8.0, "fp32@16": 11.0, "bf16@16": 7.0}
    assert exact._int8_batches(times, 8) == (0, -1)  # at 8 the bf16 shortlist is faster
    times["bf16@8"] = 6.0
    assert exact._int8_batches(times, 8) == (SMALL_BATCH + 1, 16)


@pytest.mark.parametrize(("n", "with_dead"), [(40_000, False), (40_000, True), (33_000, True), (3_000, True)])
def test_top_returns_rows_that_no_other_row_outscores(n: int, with_dead: bool) -> None:
    """`Int8Scores.top` (two passes over blocks of rows from about 4 x s blocks on, one top-k below): s live rows
    with their own int8 scores, every other live row scoring at most the least of them, padding never returned."""
    rng = np.random.default_rng(n)
    x = torch.from_numpy(_unit(rng, n, 32))
    x[100:140] = x[7]  # duplicates: ties
    q = torch.from_numpy(_unit(rng, 5, 32))
    q[1] = x[7]
    kernel = Int8Scores(x)
    dead = torch.from_numpy(rng.random(n) < 0.3) if with_dead else None
    values, rows = kernel.top(q, 256, dead)
    full = kernel.scores(q)
    if dead is not None:
        full.masked_fill_(dead, float("-inf"))
    assert rows.shape == (5, 256) and int(rows.max()) < n
    for i in range(5):
        assert len(set(rows[i].tolist())) == 256
        assert torch.equal(values[i], full[i, rows[i]]) and torch.isfinite(values[i]).all()
        others = torch.ones(n, dtype=torch.bool)
        others[rows[i]] = False
        assert full[i, others].max() <= values[i].min()


def test_a_large_index_answers_through_the_block_pass_as_faiss_does(int8_on) -> None:
    rng = np.random.default_rng(11)
    x, q = _unit(rng, 40_000, 16), _unit(rng, 8, 16)
    ex = ExactSearch.for_index(_flat(x))
    _check_like_faiss(ex, x, q, 32)
    assert ex.int8_shortlisted == 8


def test_concurrent_searches_share_one_int8_copy(int8_on) -> None:
    """Batches run in two threads at once in the server: searches from several threads through one prepacked int8
    copy each get their own exact answer."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(17)
    x = _unit(rng, 3000, 64)
    ex = ExactSearch.for_index(_flat(x))
    batches = [_unit(rng, 1 + i % 12, 64) for i in range(48)]
    want = [_flat(x).search(q, 16) for q in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: ex.search(q, 16), batches))
    for (ws, wr), (gs, gr) in zip(want, got):
        np.testing.assert_allclose(gs, ws, atol=1e-5, rtol=0)
        assert np.array_equal(np.sort(gr, 1), np.sort(wr, 1))
    assert ex.int8_shortlisted > 0  # (a plain counter: concurrent += may drop a count, never add one)
