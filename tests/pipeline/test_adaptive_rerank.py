"""Adaptive rerank (linker.adaptive_terms): only the mentions where the score without OT is not decisive go to the
cross scorer; the others keep every cheap term and get a cross term of 0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kg_index.load import EntityMeta
from models.features import Features
from service.pipeline.kg_terms import KGTerms
from service.pipeline.linker import Snapshot, adaptive_terms, top_margin
from service.pipeline.rerank import RerankConfig
from service.pipeline.terms import TERMS
from service.pipeline.types import LinkQuery, OTStats
from service.settings import RerankSettings

KB = [EntityMeta(id=f"Q{i}", name=n, description="", has_image=False, start_year=None, end_year=None)
      for i, n in enumerate(["Paris", "Paris Hilton", "Berlin", "Bern"])]


@dataclass
class FakeIndex:
    entities: list[EntityMeta]


def _feats(b: int) -> Features:
    """Features whose rows carry their mention's number, so a subset shows which mentions reached the scorer."""
    ids = np.arange(b, dtype=np.float32)
    return Features(ids[:, None], ids[:, None, None] * np.ones((b, 2, 3), np.float32), np.ones((b, 2), np.uint8),
                    np.zeros((b, 1, 3), np.float32), np.zeros(b, bool), None)


def _snapshot(seen: list[list[int]]) -> Snapshot:
    def cross(index, feats, rows, cfg, device, timings=None):
        seen.append(feats.global_[:, 0].astype(int).tolist())
        assert len(rows) == len(feats.global_)
        return np.full(rows.shape, 0.5, np.float32), [OTStats(rows.size, 3, rows.size, 0.0)]

    return Snapshot(FakeIndex(KB), featurizer=None, cross=cross, kg_terms=KGTerms(KB))  # type: ignore[arg-type]


def test_top_margin_ignores_missing_candidates() -> None:
    scores = np.array([[0.9, 0.5, 0.1], [0.3, 0.8, 0.0], [0.7, 0.6, 0.2]], np.float32)
    rows = np.array([[0, 1, 2], [0, 1, -1], [3, -1, -1]])
    np.testing.assert_allclose(top_margin(scores, rows), [0.4, 0.5, np.inf], rtol=1e-6)
    assert top_margin(scores[:, :1], rows[:, :1]).tolist() == [np.inf] * 3


def test_only_undecided_mentions_reach_the_cross_scorer() -> None:
    cfg = RerankConfig.from_settings(RerankSettings())
    queries = [LinkQuery("Paris", "Paris in spring"), LinkQuery("Bern", "Bern"), LinkQuery("Berlin", "x")]
    rows = np.array([[0, 1], [2, 3], [2, 3]])
    # Mention 0: retrieval tie (undecided); 1: retrieval far apart; 2: close.
    retrieval = np.array([[0.50, 0.50], [0.90, 0.10], [0.61, 0.60]], np.float32)
    seen: list[list[int]] = []
    snap = _snapshot(seen)

    values, stats, skip = adaptive_terms(snap, queries, _feats(3), rows, retrieval, cfg, None, None)
    assert skip.tolist() == [False] * 3 and seen == [[0, 1, 2]] and len(stats) == 1
    assert (values["rerank_score"] == 0.5).all() and set(values) == {t.field for t in TERMS}
    cheap = {f: v for f, v in values.items() if f != "rerank_score"}

    seen.clear()
    values, stats, skip = adaptive_terms(snap, queries, _feats(3), rows, retrieval, cfg, None, 0.3)
    assert skip.tolist() == [False, True, False] and seen == [[0, 2]]
    assert values["rerank_score"].tolist() == [[0.5, 0.5], [0.0, 0.0], [0.5, 0.5]]
    assert all(np.array_equal(values[f], v) for f, v in cheap.items())  # cheap terms for every mention

    seen.clear()
    values, stats, skip = adaptive_terms(snap, queries, _feats(3), rows, retrieval, cfg, None, float("-inf"))
    assert skip.all() and seen == [] and stats == [] and not values["rerank_score"].any()
