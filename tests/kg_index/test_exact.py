"""Exact search for Flat indexes (kg_index/exact.py): the same rows and scores as FAISS's IndexFlatIP (ties
aside), and only Flat inner-product indexes take that path."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from kg_index.exact import ExactSearch, flat_vectors


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _flat(x: np.ndarray) -> faiss.Index:
    index = faiss.index_factory(x.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    return index


@pytest.mark.parametrize(("n", "d", "b", "k"), [(2000, 384, 64, 32), (500, 96, 1, 10), (300, 40, 19, 300), (7, 8, 3, 1)])
def test_same_rows_and_scores_as_faiss_flat(n: int, d: int, b: int, k: int) -> None:
    rng = np.random.default_rng(n + d)
    x, q = _unit(rng, n, d), _unit(rng, b, d)
    index = _flat(x)
    want_scores, want_rows = index.search(q, k)
    scores, rows = ExactSearch.for_index(index).search(q, k)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (b, k)
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


def test_ties_give_a_valid_top_k() -> None:
    x = np.repeat(_unit(np.random.default_rng(0), 3, 16), 4, axis=0)  # every vector four times
    q = x[[0, 5]]
    scores, rows = ExactSearch.for_index(_flat(x)).search(q, 4)  # owns the index
    assert set(rows[0]) == {0, 1, 2, 3} and set(rows[1]) == {4, 5, 6, 7}
    np.testing.assert_allclose(scores, 1.0, atol=1e-5)


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
