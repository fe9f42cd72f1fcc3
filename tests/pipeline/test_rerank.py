"""Rerank stage: OT scores over a fake in-memory index (unit), and the real Linker on the small index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from models.features import SEG_FIRST, SEG_SECOND, Features
from models.sinkhorn import OTProblem, solve, uniform_marginals
from service.pipeline.rerank import RerankConfig, ot_rerank
from service.pipeline.strings import context_name_similarity, name_similarity
from service.pipeline.types import LinkQuery
from service.settings import RerankSettings

D, T, P = 8, 12, 4


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class FakeIndex:
    """Just the arrays ot_rerank reads (a unit-test fake, not a real KGIndex)."""

    text_local: np.ndarray
    text_seg: np.ndarray
    image_rows: np.ndarray
    image_local: np.ndarray


def _fake(n: int = 6, seed: int = 0) -> FakeIndex:
    rng = np.random.default_rng(seed)
    seg = np.zeros((n, T), np.uint8)
    for i in range(n):
        name_len = 1 + i % 3
        seg[i, :name_len] = SEG_FIRST
        seg[i, name_len : name_len + 4] = SEG_SECOND
    tok = _unit(rng.standard_normal((n, T, D))) * (seg > 0)[..., None]
    rows = np.full(n, -1, np.int32)
    rows[1] = 0
    return FakeIndex(tok.astype(np.float16), seg, rows, _unit(rng.standard_normal((1, P, D))).astype(np.float16))


def _query(b: int, seed: int = 1, image: bool = False) -> Features:
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, T), np.uint8)
    seg[:, :5] = SEG_FIRST
    seg[:, 5:7] = SEG_SECOND
    tok = _unit(rng.standard_normal((b, T, D))) * (seg > 0)[..., None]
    present = np.full(b, image)
    img = _unit(rng.standard_normal((b, P, D))) * present[:, None, None]
    return Features(np.zeros((b, 4), np.float32), tok, seg, img.astype(np.float32), present)


def _reference_text_score(q: Features, i: int, index: FakeIndex, row: int, cfg: RerankConfig) -> float:
    """OT on the full padded arrays, without the trimming ot_rerank does."""
    qx = torch.from_numpy(q.text_local[i : i + 1])
    ex = torch.from_numpy(index.text_local[row : row + 1].astype(np.float32))
    sim = qx @ ex.transpose(1, 2)
    a = uniform_marginals(torch.from_numpy(q.text_seg[i : i + 1] > 0))
    b = uniform_marginals(torch.from_numpy(index.text_seg[row : row + 1] == SEG_FIRST))
    res = solve(OTProblem(1 - sim, a, b, cfg.eps), max_iter=cfg.max_iter, tol=cfg.tol)
    return float((res.plan * sim).sum())


def test_ot_scores_match_untrimmed_reference_and_pad_missing_rows() -> None:
    index, cfg = _fake(), RerankConfig.from_settings(RerankSettings())
    q = _query(2)
    rows = np.array([[0, 2, 3, -1], [4, 5, 0, -1]])
    scores, stats = ot_rerank(index, q, rows, cfg, torch.device("cpu"))
    assert scores.shape == (2, 4)
    for i in range(2):
        for j in range(3):
            assert scores[i, j] == pytest.approx(_reference_text_score(q, i, index, rows[i, j], cfg), abs=1e-4)
    assert (scores[:, 3] == 0).all()
    # Empty slots are zero-mass problems (converged at once); real ones end near the marginals.
    assert stats[0].problems == 8 and stats[0].iterations <= cfg.max_iter and stats[0].max_marginal_error < 1e-2


def test_same_scores_alone_or_in_a_batch() -> None:
    index, cfg = _fake(), RerankConfig.from_settings(RerankSettings())
    q = _query(3, seed=5)
    rows = np.array([[0, 1, 2], [3, 4, 5], [5, 0, 2]])
    batch, _ = ot_rerank(index, q, rows, cfg, torch.device("cpu"))
    for i in range(3):
        one = Features(q.global_[i : i + 1], q.text_local[i : i + 1], q.text_seg[i : i + 1],
                       q.image_local[i : i + 1], q.image_present[i : i + 1])
        alone, _ = ot_rerank(index, one, rows[i : i + 1], cfg, torch.device("cpu"))
        np.testing.assert_allclose(alone[0], batch[i], atol=1e-5)


def test_visual_unit_applies_only_when_both_sides_have_an_image() -> None:
    index, cfg = _fake(), RerankConfig.from_settings(RerankSettings())
    rows = np.array([[0, 1]])  # only row 1 has an image
    text_only, stats_t = ot_rerank(index, _query(1, image=False), rows, cfg, torch.device("cpu"))
    with_img, stats_i = ot_rerank(index, _query(1, image=True), rows, cfg, torch.device("cpu"))
    assert len(stats_t) == 1 and len(stats_i) == 2  # the visual unit ran once, for the one pair
    assert with_img[0, 0] == pytest.approx(text_only[0, 0], abs=1e-6)
    assert with_img[0, 1] != pytest.approx(text_only[0, 1], abs=1e-4)


def test_name_similarity() -> None:
    sim = name_similarity(["Douglas Adams", "berlin"], [["Douglas Adams", "Douglas Hurd", "Adams"], ["Berlin"]])
    assert sim.shape == (2, 3)
    assert sim[0, 0] == pytest.approx(1.0)
    assert sim[0, 0] > sim[0, 1]
    assert sim[1, 0] == pytest.approx(1.0)  # case-insensitive
    assert sim[1, 1] == 0.0  # padding


def test_context_name_similarity_sees_the_full_name_in_the_sentence() -> None:
    texts = ["Rice Susan Elizabeth Rice is an American diplomat.", "Jordan", ""]
    names = [["Susan Rice", "Condoleezza Rice", "Rice"], ["Michael Jordan"], ["Anyone"]]
    sim = context_name_similarity(texts, names)
    assert sim.shape == (3, 3)
    assert sim[0, 0] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(1.0)  # every name token is there
    assert sim[0, 1] < sim[0, 0]  # "Condoleezza" is not
    assert sim[1, 0] == pytest.approx(1.0)  # symmetric: a text without context inside the name counts too
    assert sim[2, 0] == 0.0 and sim[1, 1] == 0.0  # empty text; padding


# --- the real Linker on the small real index (session fixtures in tests/conftest.py) ---


@pytest.mark.slow
def test_linker_links_exact_name_mentions_and_is_batch_invariant(linker, test_mentions) -> None:
    names = {e.id: e.name for e in linker.index.entities}
    easy = [m for m in test_mentions if names.get(m.answer, "").lower() == m.mention.lower()][:8]
    assert len(easy) >= 4
    queries = [LinkQuery(m.mention, m.context, None, top_k=5) for m in easy]
    batch = linker.link_batch(queries)
    hits = sum(r.entities[0].id == m.answer for r, m in zip(batch.results, easy))
    assert hits >= len(easy) - 1
    for q, r in zip(queries, batch.results):
        alone = linker.link(q)
        assert [c.id for c in alone.entities] == [c.id for c in r.entities]
        scores = [c.score for c in r.entities]
        assert scores == sorted(scores, reverse=True)
    assert set(batch.timings_ms) >= {"encode", "retrieve", "rerank", "total"}
    # The rerank stage's parts: each timed, together within the stage's total (which also mixes the terms).
    from service.pipeline.types import RERANK_STAGES

    parts = [batch.timings_ms[s] for s in RERANK_STAGES]
    assert all(p >= 0 for p in parts) and batch.timings_ms["rerank_sinkhorn"] > 0
    assert sum(parts) <= batch.timings_ms["rerank"] * 1.01 + 0.05


@pytest.mark.slow
def test_rerank_off_returns_retrieval_order(linker, test_mentions) -> None:
    m = test_mentions[0]
    out = linker.link_batch([LinkQuery(m.mention, m.context, None, top_k=10)], rerank=False).results[0]
    assert all(c.rerank_score is None for c in out.entities)
    retrieval = [c.retrieval_score for c in out.entities]
    assert retrieval == sorted(retrieval, reverse=True)
    assert [c.score for c in out.entities] == retrieval
