"""The NIL protocol (service/offline/nil_protocol.py): a deterministic 20 % of the gold entities, their rows masked
at search time (service/pipeline/retrieve.py: exactly the KB without them), and the NIL metrics."""

from __future__ import annotations

import numpy as np
import pytest

from kg_index.exact import ExactSearch
from service.offline.nil_protocol import nil_metrics, removed_entities
from service.pipeline.retrieve import retrieve


def test_removed_entities_are_a_fixed_share_fixed_by_the_seed() -> None:
    golds = [f"Q{i}" for i in range(1, 101)] * 3  # repeated golds count once
    first = removed_entities(golds)
    assert len(first) == 20 and first <= set(golds)
    assert removed_entities(reversed(golds)) == first  # not the order of the mentions
    assert removed_entities(golds, seed=19) != first
    assert len(removed_entities(golds, fraction=0.5)) == 50
    assert removed_entities([]) == frozenset()


def test_nil_metrics_on_a_toy_case() -> None:
    # 6 mentions: 2 without an answer (0, 1); the rule says nil for 1, 2 and 3; top-1 right for 2, 4, 5
    no_answer = np.array([1, 1, 0, 0, 0, 0], bool)
    said_nil = np.array([0, 1, 1, 1, 0, 0], bool)
    right = np.array([0, 0, 1, 0, 1, 1], bool)
    m = nil_metrics(no_answer, said_nil, right)
    assert m["nil_precision"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["nil_recall"] == pytest.approx(0.5)
    assert m["nil_f1"] == pytest.approx(0.4)
    assert m["h@1_answerable"] == pytest.approx(0.5)  # mention 2 was right but said nil: a miss
    assert m["h@1_answerable_ranked"] == pytest.approx(0.75)
    assert nil_metrics(no_answer, np.zeros(6, bool), right)["nil_f1"] == 0.0


class _Index:
    """What retrieve reads of a KGIndex: len and an exact search."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.exact = ExactSearch(vectors)

    def __len__(self) -> int:
        return len(self.exact)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.exact.search(queries, max(1, min(k, len(self))))


def test_excluded_rows_are_exactly_the_kb_without_them() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 16)).astype(np.float32)
    queries = vectors[:8] + 0.01 * rng.normal(size=(8, 16)).astype(np.float32)  # each query's own row is its top-1
    excluded = np.array([0, 3, 5, 17, 42, 99])
    scores, rows = retrieve(_Index(vectors), queries, 10, excluded)
    keep = np.setdiff1d(np.arange(200), excluded)
    ref_scores, ref_rows = _Index(vectors[keep]).search(queries, 10)
    np.testing.assert_array_equal(rows, keep[ref_rows])
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    assert not np.isin(rows, excluded).any()
    plain = retrieve(_Index(vectors), queries, 10)[1]
    assert plain[0, 0] == 0 and rows[0, 0] != 0  # the masked row was the top-1 before
    # k larger than what is left: k' = KB size - excluded
    assert retrieve(_Index(vectors[:10]), queries, 10, np.array([1, 2]))[1].shape == (8, 8)
