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


def _scored(name: str, no_answer: list[int], right: list[int]):
    from service.offline.calibration import Scored

    n = len(no_answer)
    gold = np.where(np.array(right, bool), 0, -1)
    return Scored(name, np.array(["m"] * n), np.zeros((n, 2, 9), np.float32), gold, np.array(no_answer, bool),
                  np.zeros((n, 3)))


def test_threshold_is_the_best_f1_within_one_h1_point_on_every_split() -> None:
    from service.offline.calibration import choose_threshold

    # 100 mentions: 20 without an answer (P(answerable) 0.05-0.24), 80 with one, 79 of them right; answerable
    # mentions at 0.30 (the wrong one) and 0.35 (one right one): a threshold above 0.35 costs 1.27 H@1 points
    no_answer = [1] * 20 + [0] * 80
    right = [0] * 20 + [0] + [1] * 79
    p = np.concatenate([np.linspace(0.05, 0.24, 20), [0.30, 0.35], np.full(78, 0.9)])
    split = _scored("toy", no_answer, right)
    today = split.top1_right
    t = choose_threshold([p], [split], [today])
    assert 0.24 < t <= 0.35  # all 20 NIL caught, the right answer at 0.35 kept (0.30 may go: it was wrong anyway)
    said = p < t
    assert said[:20].all() and not said[21]
    # a second split where any threshold above 0.1 costs more than a point pins it lower for both
    tight = _scored("tight", [1] * 5 + [0] * 10, [0] * 5 + [1] * 10)
    p2 = np.concatenate([np.full(5, 0.05), np.full(10, 0.12)])
    t2 = choose_threshold([p, p2], [split, tight], [today, tight.top1_right])
    assert t2 <= 0.12
