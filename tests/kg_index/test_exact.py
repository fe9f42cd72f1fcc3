"""Exact search for Flat indexes (kg_index/exact.py): the same rows and scores as FAISS's IndexFlatIP (ties
aside), and only Flat inner-product indexes take that path."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from kg_index.exact import SMALL_BATCH, ExactSearch, flat_vectors


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _flat(x: np.ndarray) -> faiss.Index:
    index = faiss.index_factory(x.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    return index


def _with_duplicates(copies: int, others: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, queries): `copies` duplicates of one row among others, and `batch` queries equal to that row."""
    rng = np.random.default_rng(copies)
    base = _unit(rng, 5, 16)
    x = np.concatenate([base, np.repeat(base[[2]], copies, axis=0), base, _unit(rng, others, 16)])
    return x, np.repeat(base[[2]], batch, axis=0)


def _near_tied(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, queries): 600 rows whose scores all lie within ~1e-3 of each other for `batch` queries, too close
    for a short shortlist's rounding bound."""
    rng = np.random.default_rng(5)
    base = _unit(rng, 1, 64)
    x = base + 1e-3 * rng.standard_normal((600, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.repeat(base, batch, axis=0) + 0.01 * rng.standard_normal((batch, 64)).astype(np.float32)


@pytest.mark.parametrize(("n", "d", "b", "k"), [(2000, 384, 64, 32), (500, 96, 1, 10), (500, 96, 2, 10), (300, 40, 19, 300),
                                                    (7, 8, 3, 1)])
def test_same_rows_and_scores_as_faiss_flat(n: int, d: int, b: int, k: int) -> None:
    rng = np.random.default_rng(n + d)
    x, q = _unit(rng, n, d), _unit(rng, b, d)
    _check_like_faiss(ExactSearch.for_index(_flat(x)), x, q, k)


def _check_like_faiss(ex: ExactSearch, x: np.ndarray, q: np.ndarray, k: int) -> None:
    want_scores, want_rows = _flat(x).search(q, k)
    scores, rows = ex.search(q, k)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (len(q), k)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first, as FAISS
    # Rows agree wherever the score is not tied (to float precision) with a neighbour's.
    gap = np.diff(want_scores, axis=1)
    untied = np.ones_like(want_rows, dtype=bool)
    untied[:, 1:] &= -gap > 1e-5
    untied[:, :-1] &= -gap > 1e-5
    assert np.array_equal(rows[untied], want_rows[untied])
    # Every returned row's score is its true inner product.
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, rows, axis=1), atol=1e-5, rtol=0)


def _every_other_best_dead(x: np.ndarray, q: np.ndarray):
    """(dead [N] bool tensor, live rows): every other one of each query's best 20 rows removed."""
    import torch

    _, best = _flat(x).search(q, 20)
    dead = torch.zeros(len(x), dtype=torch.bool)
    dead[torch.from_numpy(best[:, ::2].ravel())] = True
    return dead, np.flatnonzero(~dead.numpy())


@pytest.mark.parametrize("batch", [1, SMALL_BATCH + 1])  # FAISS's own scan, then the GEMM
@pytest.mark.parametrize(("copies", "k"), [(4, 8), (4, 40), (40, 50)])
def test_duplicates_in_faiss_order(copies: int, k: int, batch: int) -> None:
    """Duplicate entities score exactly alike: within the top k they come as FAISS's heap orders them, the larger
    row first, so the same duplicate wins, alone or in a batch."""
    rng = np.random.default_rng(copies)
    base = _unit(rng, 5, 16)
    x = np.concatenate([base, np.repeat(base[[2]], copies, axis=0), base, _unit(rng, 30, 16)])
    index = _flat(x)
    q = np.repeat(base[[2]], batch, axis=0)  # the duplicated vector itself: its copies are the best hits
    want_scores, want_rows = index.search(q, k)
    scores, rows = ExactSearch.for_index(_flat(x)).search(q, k)  # owns the index it is given
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, SMALL_BATCH + 1])
@pytest.mark.parametrize("copies", [3, 3 * 16])  # a group cut by the k-th place within the margin, and past it
def test_a_tie_cut_by_k_keeps_its_largest_rows_alone_or_in_a_batch(batch: int, copies: int) -> None:
    """A tie group that the k-th place cuts: the k largest rows of the whole group, larger first, whether the query
    came alone (FAISS's scan finds the candidates) or in a batch (the GEMM)."""
    from kg_index.exact import TIE_MARGIN

    base = _unit(np.random.default_rng(3), 3, 16)
    assert 3 * 16 > 5 + TIE_MARGIN > 3
    x = np.concatenate([base, np.repeat(base[[1]], copies, axis=0), _unit(np.random.default_rng(4), 20, 16)])
    q = np.repeat(base[[1]], batch, axis=0)
    _, rows = ExactSearch.for_index(_flat(x)).search(q, 2)
    group = [1, *range(3, 3 + copies)]
    assert rows.tolist() == [sorted(group, reverse=True)[:2]] * batch


def test_flat_vectors_is_a_view_of_the_index_and_only_for_flat_ip() -> None:
    x = _unit(np.random.default_rng(1), 50, 8)
    index = _flat(x)
    v = flat_vectors(index)
    assert v is not None and v.shape == (50, 8) and np.array_equal(v, x)
    assert flat_vectors(faiss.IndexFlatL2(8)) is None  # L2: FAISS
    hnsw = faiss.index_factory(8, "HNSW8,Flat", faiss.METRIC_INNER_PRODUCT)
    hnsw.add(x)
    assert flat_vectors(hnsw) is None  # approximate indexes stay FAISS
    assert ExactSearch.for_index(hnsw) is None and ExactSearch.for_index(faiss.IndexFlatL2(8)) is None
    back = faiss.deserialize_index(faiss.serialize_index(index))  # as load_index reads it
    assert np.array_equal(ExactSearch.for_index(back).vectors, x)


def test_bad_arguments() -> None:
    ex = ExactSearch(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError):
        ex.search(np.zeros((1, 3), np.float32), 5)
    with pytest.raises(ValueError):
        ExactSearch(np.zeros((4, 3), np.float64))


# FAISS's scan with extra hits, the masked GEMM, the masked bf16 shortlist (forced on)
@pytest.mark.parametrize("batch", [1, SMALL_BATCH + 1, 16])
def test_dead_rows_are_never_returned_alone_or_in_a_batch(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from kg_index import exact

    monkeypatch.setattr(exact, "_coarse_mode", "on")

    rng = np.random.default_rng(7)
    x, q = _unit(rng, 400, 32), _unit(rng, batch, 32)
    index = _flat(x)
    _, best = index.search(q, 20)
    dead = torch.zeros(len(x), dtype=torch.bool)
    dead[torch.from_numpy(best[:, ::2].ravel())] = True  # every other of each query's best 20
    ex = ExactSearch.for_index(index)
    scores, rows = ex.search(q, 10, dead=dead)
    assert ex.shortlisted == (batch if batch >= exact.COARSE_MIN_BATCH else 0)
    live = np.flatnonzero(~dead.numpy())
    want_scores, want_rows = _flat(x[live]).search(q, 10)
    assert not dead.numpy()[rows].any()
    assert np.array_equal(rows, live[want_rows])
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)


# ---- the bf16 shortlist (forced on: it is exact on any CPU, only slower without native bf16) ----


@pytest.fixture
def coarse_on():
    from kg_index import exact

    before = exact._coarse_mode
    exact.configure_coarse("on")
    yield
    exact.configure_coarse(before)


@pytest.mark.parametrize(("n", "d", "b", "k"), [(2000, 384, 64, 32), (3000, 96, 16, 10), (500, 40, 12, 300),
                                               (2500, 384, 6, 32)])
def test_bf16_shortlist_returns_the_fp32_rows_and_scores(coarse_on, n: int, d: int, b: int, k: int) -> None:
    from kg_index.exact import COARSE_MIN_BATCH

    assert b >= COARSE_MIN_BATCH
    rng = np.random.default_rng(n + d)
    x, q = _unit(rng, n, d), _unit(rng, b, d)
    ex = ExactSearch.for_index(_flat(x))
    _check_like_faiss(ex, x, q, k)
    assert ex.shortlisted == (b if k + 16 + 80 < n else 0)  # k = 300 of 500 leaves no room: the fp32 GEMM


def test_bf16_shortlist_searches_again_in_fp32_where_its_bound_does_not_clear(coarse_on, monkeypatch) -> None:
    """A shortlist too short for its bound (COARSE_EXTRA 0, near-tied vectors): the queries are searched again in
    fp32 and the answer stays exact."""
    from kg_index import exact

    monkeypatch.setattr(exact, "COARSE_EXTRA", 1)
    x, q = _near_tied(16)
    ex = ExactSearch.for_index(_flat(x))
    scores, rows = ex.search(q, 20)
    assert ex.fp32_researches > 0
    want_scores, want_rows = _flat(x).search(q, 20)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6, rtol=0)
    assert np.array_equal(np.sort(rows, 1), np.sort(want_rows, 1))


@pytest.mark.parametrize(("copies", "k"), [(4, 8), (4, 40), (40, 50)])
def test_bf16_shortlist_keeps_faiss_order_for_duplicates(coarse_on, copies: int, k: int) -> None:
    x, q = _with_duplicates(copies, 300, 16)
    want_scores, want_rows = _flat(x).search(q, k)
    ex = ExactSearch.for_index(_flat(x))
    scores, rows = ex.search(q, k)
    assert ex.shortlisted == 16
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("copies", [3, 3 * 16, 200])  # cut within the margin, past it, past the shortlist
def test_bf16_shortlist_cuts_a_tie_group_at_its_largest_rows(coarse_on, copies: int) -> None:
    base = _unit(np.random.default_rng(3), 3, 16)
    x = np.concatenate([base, np.repeat(base[[1]], copies, axis=0), _unit(np.random.default_rng(4), 300, 16)])
    q = np.repeat(base[[1]], 16, axis=0)
    _, rows = ExactSearch.for_index(_flat(x)).search(q, 2)
    group = [1, *range(3, 3 + copies)]
    assert rows.tolist() == [sorted(group, reverse=True)[:2]] * 16


def test_bf16_shortlist_modes() -> None:
    from kg_index import exact

    before = exact._coarse_mode
    x = _unit(np.random.default_rng(9), 300, 16)
    try:
        exact.configure_coarse("off")
        assert not exact.coarse_enabled()
        ex = ExactSearch.for_index(_flat(x))
        assert ex._coarse is None  # off: no copy
        ex.search(x[:16], 5)
        assert ex._coarse is None  # and none made by a search
        exact.configure_coarse("on")
        ex.search(x[:16], 5)
        assert ex._coarse is not None  # turned on later: made on first use
        exact.configure_coarse("auto")
        assert exact.coarse_enabled() == exact.cpu_has_bf16()
        with pytest.raises(ValueError):
            exact.configure_coarse("fast")  # type: ignore[arg-type]
    finally:
        exact.configure_coarse(before)


# ---- the search plan (measured per CPU): every plan answers the same rows ----


@pytest.mark.parametrize("layout", ["queries", "vectors"])
@pytest.mark.parametrize("b", [SMALL_BATCH + 1, 8, 30])
def test_both_fp32_layouts_return_faiss_rows(monkeypatch: pytest.MonkeyPatch, layout: str, b: int) -> None:
    from kg_index import exact

    monkeypatch.setattr(exact, "_coarse_mode", "off")
    rng = np.random.default_rng(b)
    x, q = _unit(rng, 3000, 96), _unit(rng, b, 96)
    ex = ExactSearch.for_index(_flat(x))
    ex.plan = exact.SearchPlan(layout, layout)  # type: ignore[arg-type]
    _check_like_faiss(ex, x, q, 32)
    assert ex._fp32_scores(q, None).is_contiguous()


@pytest.mark.parametrize(("limit", "b", "shortlisted"), [(8, 8, True), (8, 16, False), (5, 6, False),
                                                           (None, 64, True)])
def test_plan_limits_the_shortlist_to_its_batches(monkeypatch: pytest.MonkeyPatch, limit: int | None, b: int,
                                                  shortlisted: bool) -> None:
    from kg_index import exact

    monkeypatch.setattr(exact, "_coarse_mode", "auto")
    monkeypatch.setattr(exact, "cpu_has_bf16", lambda: True)  # the shortlist is exact on any CPU, only slower
    rng = np.random.default_rng(b)
    x, q = _unit(rng, 2000, 64), _unit(rng, b, 64)
    ex = ExactSearch.for_index(_flat(x))
    ex.plan = exact.SearchPlan("queries", "queries", limit)
    _check_like_faiss(ex, x, q, 32)
    assert ex.shortlisted == (b if shortlisted else 0)


def test_calibration_measures_each_kernel_once_per_size_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """An index past CALIBRATE_MIN_ROWS (auto mode) times its kernels at load: a plan of allowed values, every timing
    recorded, cached for the next index of its size class, and answering as FAISS does."""
    from kg_index import exact

    monkeypatch.setattr(exact, "_coarse_mode", "auto")
    monkeypatch.setattr(exact, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(exact, "_plans", {})
    rng = np.random.default_rng(21)
    x = _unit(rng, exact.CALIBRATE_MIN_ROWS + 100, 32)
    counts = exact.SEARCH_COUNTS.snapshot()
    ex = ExactSearch.for_index(_flat(x))
    assert exact.SEARCH_COUNTS.snapshot() == counts  # the calibration's searches are not the service's
    plan = ex.plan
    assert plan.measured is not None
    assert {f"{layout}@{b}" for layout in ("queries", "vectors") for b in (8, 64)} <= plan.measured.keys()
    assert {f"{kind}@{b}" for kind in ("fp32", "bf16") for b in exact.CALIBRATE_BATCHES} <= plan.measured.keys()
    spare = {"faiss": "faiss@1", "halves": "halves@1", "bf16_halves": "bf16_halves@1", "bf16": "bf16_alone@1"}
    alone = {"faiss": "faiss@1", "bf16": "bf16_alone@1"}
    if exact.int8_enabled():  # the int8 shortlist competes too, where FBGEMM's int8 products are exact
        spare["int8"] = alone["int8"] = "int8@1"
        assert {f"int8@{b}" for b in exact.CALIBRATE_BATCHES} <= plan.measured.keys()
        lo, hi = plan.int8_batches
        assert (lo, hi) == (0, -1) or (lo == SMALL_BATCH + 1 and hi in exact.CALIBRATE_BATCHES)
    assert set(spare.values()) <= plan.measured.keys()
    # the fastest kernel for one query with a spare core, and without one (the report rounds to 0.01 ms; the choice
    # used the unrounded times)
    assert plan.measured[spare[plan.small]] <= min(plan.measured[v] for v in spare.values()) + 0.01
    assert plan.measured[alone[plan.small_alone]] <= min(plan.measured[v] for v in alone.values()) + 0.01
    assert (ex._scan is not None) == (plan.small.startswith("bf16") or plan.small_alone == "bf16")
    assert plan.coarse_max_batch in (exact.COARSE_MIN_BATCH - 1, *exact.CALIBRATE_BATCHES[:-1], None)
    assert all(v > 0 for v in plan.measured.values())
    assert ExactSearch.for_index(_flat(x[:-1])).plan is plan  # same size class: measured once
    # the calibration's own searches are not counted
    assert ex.shortlisted == ex.scan_shortlisted == ex.int8_shortlisted == 0
    for b in (8, 64):
        _check_like_faiss(ex, x, _unit(rng, b, 32), 32)


def test_small_indexes_and_forced_modes_keep_the_default_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    from kg_index import exact

    monkeypatch.setattr(exact, "_plans", {})
    x = _unit(np.random.default_rng(2), exact.CALIBRATE_MIN_ROWS - 1, 16)
    assert ExactSearch.for_index(_flat(x)).plan == exact.SearchPlan()
    monkeypatch.setattr(exact, "_coarse_mode", "on")
    assert ExactSearch.for_index(_flat(_unit(np.random.default_rng(2), exact.CALIBRATE_MIN_ROWS, 16))).plan \
        == exact.SearchPlan()
    assert not exact._plans


@pytest.mark.parametrize("b", [1, SMALL_BATCH])
@pytest.mark.parametrize("with_dead", [False, True])
def test_one_or_two_queries_in_row_halves_on_a_spare_core(monkeypatch: pytest.MonkeyPatch, b: int,
                                                          with_dead: bool) -> None:
    """With a spare core (and a plan that measured it faster) the GEMV runs in two row halves at once: FAISS's rows
    and scores, dead rows never returned; without one, or with a plan against it, FAISS's scan answers."""
    from concurrent.futures import ThreadPoolExecutor

    from kg_index import exact

    rng = np.random.default_rng(b + 10 * with_dead)
    x, q = _unit(rng, 3001, 48), _unit(rng, b, 48)
    ex = ExactSearch.for_index(_flat(x))
    calls: list[int] = []
    inner = ExactSearch._in_row_halves
    monkeypatch.setattr(ExactSearch, "_in_row_halves", lambda self, *a: calls.append(1) or inner(self, *a))
    dead, live = _every_other_best_dead(x, q) if with_dead else (None, np.arange(len(x)))
    want_scores, want_rows = _flat(x[live]).search(q, 10)
    with ThreadPoolExecutor(1) as spare:
        for small, expect_calls in (("faiss", 0), ("halves", 1)):
            ex.plan = exact.SearchPlan(small=small)
            with exact.spare_core(spare):
                scores, rows = ex.search(q, 10, dead=dead)
            assert len(calls) == expect_calls
            assert np.array_equal(rows, live[want_rows])
            np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
        ex.search(q, 10, dead=dead)  # no spare core outside the block: FAISS's scan
    assert len(calls) == 1


# ---- the bf16 scan for one or two queries ----


@pytest.mark.parametrize("b", [1, SMALL_BATCH])
@pytest.mark.parametrize("kernel", ["bf16", "bf16_halves"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_bf16_scan_returns_faiss_rows_alone_or_on_a_spare_core(b: int, kernel: str, with_dead: bool) -> None:
    """One or two queries through the bf16 scan (its halves one after the other, or at once on a spare core):
    FAISS's rows and scores, dead rows never returned, and no fp32 re-search on well-spread vectors."""
    from concurrent.futures import ThreadPoolExecutor

    from kg_index import exact

    rng = np.random.default_rng(b + 10 * with_dead)
    x, q = _unit(rng, 3001, 384), _unit(rng, b, 384)  # 384 dimensions: FAISS's SIMD path, as served
    ex = ExactSearch.for_index(_flat(x))
    dead, live = _every_other_best_dead(x, q) if with_dead else (None, np.arange(len(x)))
    want_scores, want_rows = _flat(x[live]).search(q, 10)
    ex.plan = exact.SearchPlan(small=kernel, small_alone="bf16")  # type: ignore[arg-type]
    with ThreadPoolExecutor(1) as spare, exact.spare_core(spare):
        scores, rows = ex.search(q, 10, dead=dead)
    assert ex.scan_shortlisted == b and ex.fp32_researches == 0
    assert np.array_equal(rows, live[want_rows])
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
    ex.plan = exact.SearchPlan(small_alone="faiss")  # no spare core, a plan against it: FAISS's scan
    assert np.array_equal(ex.search(q, 10, dead=dead)[1], live[want_rows])
    assert ex.scan_shortlisted == b


@pytest.mark.parametrize("d", [48, 384])  # FAISS's scalar and SIMD paths
def test_bf16_scan_error_is_within_its_bound_on_every_row(d: int) -> None:
    """The bound covers the scan's error on every row, for vectors of very different ranges per dimension (how
    loose it is shows in the re-searches: none for well-spread vectors, above)."""
    import torch

    rng = np.random.default_rng(d)
    x = _unit(rng, 3000, d) * np.geomspace(1e-3, 10, d).astype(np.float32)
    q = rng.standard_normal((2, d)).astype(np.float32)
    ex = ExactSearch.for_index(_flat(x))
    scan = np.concatenate([_scan_scores(sq, q) for _, sq in ex._scan_halves()], 1)
    err = np.abs(scan - q @ x.T).max(axis=1)
    bound = ex._bf16_bound(torch.from_numpy(q)).numpy()
    assert (err > 0).all() and (err <= bound).all()


def _scan_scores(sq: faiss.Index, q: np.ndarray) -> np.ndarray:
    """Every row's scan score [B, ntotal], in row order."""
    scores, rows = sq.search(q, sq.ntotal)
    out = np.empty_like(scores)
    np.put_along_axis(out, rows, scores, axis=1)
    return out


def test_bf16_scan_searches_again_in_fp32_where_its_bound_does_not_clear(monkeypatch) -> None:
    """Near-tied vectors and a one-row margin: the bound does not clear, the query is searched again in fp32 and the
    answer stays exact."""
    from kg_index import exact

    monkeypatch.setattr(exact, "COARSE_EXTRA", 1)
    rng = np.random.default_rng(5)
    base = _unit(rng, 1, 64)
    x = base + 1e-3 * rng.standard_normal((600, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = base + 0.01 * rng.standard_normal((1, 64)).astype(np.float32)
    ex = ExactSearch.for_index(_flat(x))
    ex.plan = exact.SearchPlan(small_alone="bf16")
    scores, rows = ex.search(q, 20)
    assert ex.scan_shortlisted == 1 and ex.fp32_researches == 1
    want_scores, want_rows = _flat(x).search(q, 20)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6, rtol=0)
    assert np.array_equal(np.sort(rows, 1), np.sort(want_rows, 1))


@pytest.mark.parametrize(("copies", "k"), [(4, 8), (4, 40), (40, 50)])
def test_bf16_scan_keeps_faiss_order_for_duplicates(copies: int, k: int) -> None:
    from kg_index import exact

    rng = np.random.default_rng(copies)
    base = _unit(rng, 5, 16)
    x = np.concatenate([base, np.repeat(base[[2]], copies, axis=0), base, _unit(rng, 600, 16)])
    q = base[[2]]
    want_scores, want_rows = _flat(x).search(q, k)
    ex = ExactSearch.for_index(_flat(x))
    ex.plan = exact.SearchPlan(small_alone="bf16")
    scores, rows = ex.search(q, k)
    assert ex.scan_shortlisted == 1
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)


def test_bf16_scan_leaves_a_small_index_to_faiss() -> None:
    """An index whose halves hold no more rows than the shortlist takes from each: FAISS's scan answers."""
    from kg_index import exact

    rng = np.random.default_rng(4)
    x, q = _unit(rng, 200, 16), _unit(rng, 1, 16)  # halves of 100 rows: k 10 + 16 + 80 do not fit
    ex = ExactSearch.for_index(_flat(x))
    ex.plan = exact.SearchPlan(small_alone="bf16")
    _check_like_faiss(ex, x, q, 10)
    assert ex.scan_shortlisted == 0


def test_search_counts_tell_which_kernel_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process-wide counts behind `el_exact_search_queries_total{kernel}`: one query through FAISS's scan, a
    batch through the fp32 GEMM or the bf16 shortlist, and a bound's fp32 re-search counted apart."""
    from kg_index import exact
    from service.metrics import Metrics

    rng = np.random.default_rng(3)
    x = _unit(rng, 2000, 64)
    ex = ExactSearch.for_index(_flat(x))

    def delta(before: tuple[dict[str, int], int]) -> tuple[dict[str, int], int]:
        now = exact.SEARCH_COUNTS.snapshot()
        return {k: v - before[0][k] for k, v in now[0].items() if v != before[0][k]}, now[1] - before[1]

    monkeypatch.setattr(exact, "_coarse_mode", "off")
    before = exact.SEARCH_COUNTS.snapshot()
    ex.search(_unit(rng, 1, 64), 10)
    ex.search(_unit(rng, 8, 64), 10)
    assert delta(before) == ({"faiss_scan": 1, "fp32": 8}, 0)
    monkeypatch.setattr(exact, "_coarse_mode", "on")
    monkeypatch.setattr(exact, "COARSE_EXTRA", 1)  # too short for its bound on near-tied vectors: re-searched
    tied, q = _near_tied(16)
    before = exact.SEARCH_COUNTS.snapshot()
    ExactSearch.for_index(_flat(tied)).search(q, 20)
    assert delta(before) == ({"bf16_shortlist": 16}, 16)
    text = Metrics().render().decode()
    assert 'el_exact_search_queries_total{kernel="bf16_shortlist"}' in text
    assert "el_exact_search_fp32_researches_total" in text
