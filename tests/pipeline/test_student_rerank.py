"""The served reranker on the student index: its cross terms equal OT-MEL's g2l computed directly from the
stored features (no trimming or blank-image shortcut changes them), alone or in a batch, and the final
score with weights (1, 1, 0) is the model's overall score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.otmel import cross_g2l, sinkhorn_assignment
from service.pipeline.rerank import student_rerank
from service.pipeline.terms import TERMS
from service.pipeline.types import LinkQuery

pytestmark = [pytest.mark.onnx, pytest.mark.slow]


def _reference(index, feats, rows: np.ndarray, eps: float) -> np.ndarray:
    """(g2l_T + g2l_V) / 6 for every (query, candidate), untrimmed, blank images spelled out."""
    assign = sinkhorn_assignment(eps, 500)
    out = np.zeros(rows.shape, np.float32)
    for i in range(rows.shape[0]):
        for j, r in enumerate(rows[i]):
            if r < 0:
                continue
            f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))[None]
            ug = index.unit_globals[r].astype(np.float32)
            t, _, _ = cross_g2l(f(feats.text_local[i]), torch.from_numpy(feats.text_seg[i] > 0)[None],
                                f(feats.unit_globals[i, 0]), f(index.text_local[r]),
                                torch.from_numpy(np.asarray(index.text_seg[r]) > 0)[None], f(ug[0]), assign,
                                pairwise=False)
            e_img = index.image_local[index.image_rows[r]] if index.image_rows[r] >= 0 else index.image_blank
            ones = torch.ones(1, e_img.shape[0], dtype=torch.bool)
            v, _, _ = cross_g2l(f(feats.image_local[i]), torch.ones(1, feats.image_local.shape[1], dtype=torch.bool),
                                f(feats.unit_globals[i, 1]), f(e_img), ones, f(ug[1]), assign, pairwise=False)
            out[i, j] = float(t[0] + v[0]) / 6
    return out


def test_cross_terms_match_the_model(linker, test_mentions) -> None:
    from PIL import Image

    index = linker.index
    assert index.heads, "the served default index is the student's"
    snap = linker._snapshot
    qs = [LinkQuery(m.mention, m.context, None) for m in test_mentions[:4]]
    qs.append(LinkQuery("Eiffel Tower", "A photo of the tower", Image.new("RGB", (64, 48), (200, 30, 30))))
    feats = snap.featurizer([q.mention for q in qs], [q.context for q in qs], [q.image for q in qs])
    _, rows = index.search(feats.global_, 6)
    image_rows = np.flatnonzero(index.image_rows >= 0)
    rows[0, -1] = image_rows[0]  # a candidate with its own image
    rows[1, -1] = -1  # a missing candidate
    cfg = linker.rerank
    got, stats = student_rerank(index, feats, rows, cfg, torch.device("cpu"))
    want = _reference(index, feats, rows, cfg.eps)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert got[1, -1] == 0.0 and stats and all(s.problems > 0 for s in stats)
    # Alone or in a batch: the same scores.
    from models.features import Features

    one = Features(*(a[2:3] for a in (feats.global_, feats.text_local, feats.text_seg, feats.image_local,
                                       feats.image_present, feats.unit_globals)))
    alone, _ = student_rerank(index, one, rows[2:3], cfg, torch.device("cpu"))
    np.testing.assert_allclose(alone[0], got[2], atol=1e-5)


def test_overall_weights_rank_by_the_model_score(linker, test_mentions) -> None:
    lk = linker.with_weights(**{t.weight: 0.0 for t in TERMS} | {"retrieval_weight": 1.0, "ot_weight": 1.0})
    m = test_mentions[0]
    r = lk.link(LinkQuery(m.mention, m.context, None, top_k=5))
    scores = [c.score for c in r.entities]
    assert scores == sorted(scores, reverse=True)
    for c in r.entities:
        assert c.score == pytest.approx(c.retrieval_score + c.rerank_score, abs=1e-5)
        assert -1 / 3 - 1e-4 <= c.rerank_score <= 1 / 3 + 1e-4  # two cosines over 6


def test_final_score_is_the_weighted_sum_of_the_reported_terms(linker, test_mentions) -> None:
    cfg = linker.rerank
    for m in test_mentions[:4]:
        for c in linker.link(LinkQuery(m.mention, m.context, None, top_k=5)).entities:
            assert 0.0 <= c.name_score <= 1.0 and 0.0 <= c.context_name_score <= 1.0
            assert {c.name_tokens_score, c.before_birth_score, c.after_death_score} <= {0.0, 1.0}
            assert 0.0 <= c.description_overlap_score < 1.0
            expect = cfg.retrieval_weight * c.retrieval_score + sum(
                getattr(cfg, t.weight) * getattr(c, t.field) for t in TERMS)
            assert c.score == pytest.approx(expect, abs=1e-5)
