"""explain=true returns the very plans the reranker scored with: their row and column sums are the uniform marginals
over the tokens (patches) listed, and OT-MEL's g2l terms recomputed from those plans and the stored features give the
rerank_score each candidate carries. Also: tokens are words, sizes are bounded, and the default path records nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.otmel import cross_g2l
from models.sinkhorn import OTProblem, solve
from service.pipeline.explain import EXPLAIN_TOP, PlanRecorder
from service.pipeline.types import LinkQuery

pytestmark = [pytest.mark.onnx, pytest.mark.slow]


def _fixed(plan: np.ndarray):
    """An assignment that returns the given plan, normalised per row and per column (as the reranker's does)."""
    p = torch.from_numpy(plan.astype(np.float32))[None]

    def assign(sim, mask_r, mask_c):
        assert sim.shape == p.shape
        return p / p.sum(-1, keepdim=True).clamp_min(1e-30), p / p.sum(-2, keepdim=True).clamp_min(1e-30)

    return assign


def _g2l(m_local, m_glob, e_local, e_glob, plan) -> float:
    f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))[None]
    ones_m = torch.ones(1, len(m_local), dtype=torch.bool)
    ones_e = torch.ones(1, len(e_local), dtype=torch.bool)
    g2l, _, _ = cross_g2l(f(m_local), ones_m, f(m_glob), f(e_local), ones_e, f(e_glob), _fixed(plan), pairwise=False)
    return float(g2l[0])


def _check_marginals(plan: np.ndarray, tol: float) -> None:
    n, m = plan.shape
    np.testing.assert_allclose(plan.sum(1), np.full(n, 1 / n), atol=tol)
    np.testing.assert_allclose(plan.sum(0), np.full(m, 1 / m), atol=tol)
    assert (plan >= 0).all()


@pytest.fixture(scope="module")
def image_entity(linker):
    """An entity of the index with its own KG image, and that image (a real photo from the data folder)."""
    from kg_index.readers import read_mel_kb

    index = linker.index
    by_id = {e.id: e for e in read_mel_kb(linker.settings.data_dir) if e.image is not None}
    row = next(int(r) for r in np.flatnonzero(index.image_rows >= 0) if index.entities[r].id in by_id)
    meta = index.entities[row]
    return meta, Image.open(by_id[meta.id].image).convert("RGB")


def test_explained_plans_are_the_scored_ones(linker, image_entity) -> None:
    meta, photo = image_entity
    q = LinkQuery(meta.name, f"A photo of {meta.name}.", photo, top_k=5, explain=True)
    res = linker.link_batch([q, LinkQuery("Berlin", "Berlin in 1920", None, top_k=3)]).results
    assert res[1].explain is None  # only the query that asked
    aligned = res[0].explain
    assert aligned and len(aligned) == min(EXPLAIN_TOP, len(res[0].entities))
    assert [a.id for a in aligned] == [c.id for c in res[0].entities[:EXPLAIN_TOP]]
    assert meta.id in [a.id for a in aligned]

    index, tol = linker.index, 2 * linker.settings.rerank.tol
    feats = linker.featurizer([q.mention], [q.context], [q.image])
    q_pos = np.flatnonzero(feats.text_seg[0] > 0)
    for a in aligned:
        row = index.row_of[a.id]
        assert a.scorer == "student"
        t, v = a.text, a.image
        assert t is not None and v is not None
        plan_t, plan_v = np.asarray(t.plan), np.asarray(v.plan)
        # Words, not ids; one per row / column of the plan.
        assert plan_t.shape == (len(t.mention_tokens), len(t.entity_tokens)) == (len(q_pos), plan_t.shape[1])
        assert all(isinstance(w, str) and w for w in t.mention_tokens + t.entity_tokens)
        assert "".join(t.mention_tokens[: t.mention_first]).replace("##", "") == q.mention.lower().replace(" ", "")
        assert v.grid == [7, 7] and plan_v.shape == (49, 49)
        assert v.entity_has_image == bool(index.image_rows[row] >= 0)
        _check_marginals(plan_t, tol)
        _check_marginals(plan_v, tol)

        # The OT term recomputed from the returned plans and the features they were solved over.
        e_pos = np.flatnonzero(np.asarray(index.text_seg[row]) > 0)
        ug = index.unit_globals[row].astype(np.float32)
        text = _g2l(feats.text_local[0, q_pos], feats.unit_globals[0, 0], index.text_local[row][e_pos], ug[0], plan_t)
        e_img = index.image_local[index.image_rows[row]] if index.image_rows[row] >= 0 else index.image_blank
        vis = _g2l(feats.image_local[0], feats.unit_globals[0, 1], e_img, ug[1], plan_v)
        assert text == pytest.approx(a.text_term, abs=2e-4)
        assert vis == pytest.approx(a.visual_term, abs=2e-4)
        assert (text + vis) / 6 == pytest.approx(a.rerank_score, abs=1e-4)
        # And it is the entropic OT plan of cost = 1 - cos between those tokens: solving it again gives it back.
        cost = 1.0 - feats.text_local[0, q_pos] @ index.text_local[row][e_pos].astype(np.float32).T
        again = solve(OTProblem(torch.from_numpy(cost)[None], torch.full((1, len(q_pos)), 1 / len(q_pos)),
                                torch.full((1, len(e_pos)), 1 / len(e_pos)), linker.settings.rerank.eps),
                      max_iter=500, tol=1e-7).plan[0].numpy()
        np.testing.assert_allclose(plan_t, again, atol=tol / 4)

    # The same mention without an image: text plans only; its scores equal the unexplained run's.
    q2 = LinkQuery(meta.name, "", None, top_k=3, explain=True)
    plain = linker.link(LinkQuery(meta.name, "", None, top_k=3))
    got = linker.link(q2)
    assert [c.rerank_score for c in got.entities] == [c.rerank_score for c in plain.entities]
    assert all(a.image is None and a.text is not None for a in got.explain)


def test_default_path_records_nothing(linker, monkeypatch) -> None:
    made: list[PlanRecorder] = []
    orig = PlanRecorder.__init__

    def spy(self, *args, **kwargs):
        made.append(self)
        orig(self, *args, **kwargs)

    monkeypatch.setattr(PlanRecorder, "__init__", spy)
    out = linker.link(LinkQuery("Berlin", "Berlin in 1920", None, top_k=3))
    assert out.explain is None and made == []


@pytest.fixture(scope="module")
def zeroshot_linker(small_kg, zeroshot_runtime, settings, tmp_path_factory: pytest.TempPathFactory):
    """A zero-shot index (backbone features under fitted projections) over a slice of the real KG with its images."""
    from kg_index.build import build_index
    from kg_index.load import load_index
    from service.pipeline.linker import Linker

    kg = [e for e in small_kg if e.image is not None] + [e for e in small_kg if e.image is None][:80]
    out = tmp_path_factory.mktemp("zeroshot-explain") / "index"
    build_index(kg, zeroshot_runtime, out, kg="mel-slice", local_dim=32, progress=False, batch_size=32)
    return Linker(settings, zeroshot_runtime, load_index(out, encoder_signature=zeroshot_runtime.spec.signature()))


def test_zero_shot_plans_give_the_transport_weighted_cosine(zeroshot_linker, image_entity) -> None:
    lk = zeroshot_linker
    index = lk.index
    assert not index.heads
    meta, photo = image_entity
    q = LinkQuery(meta.name, f"A photo of {meta.name}.", photo, top_k=4, explain=True)
    res = lk.link(q)
    feats = lk.featurizer([q.mention], [q.context], [q.image])
    q_pos = np.flatnonzero(feats.text_seg[0] > 0)
    tol = 2 * lk.settings.rerank.tol
    assert res.explain and {a.scorer for a in res.explain} == {"zero-shot"}
    for a in res.explain:
        row = index.row_of[a.id]
        t = a.text
        plan = np.asarray(t.plan)
        assert t.entity_first == len(t.entity_tokens)  # the name's tokens only
        _check_marginals(plan, tol)
        e_pos = np.flatnonzero(np.asarray(index.text_seg[row]) == 1)
        cos = feats.text_local[0, q_pos] @ index.text_local[row][e_pos].astype(np.float32).T
        assert float((plan * cos).sum()) == pytest.approx(a.text_term, abs=1e-5)
        if index.image_rows[row] >= 0:  # both images: the mean of the two units
            v = np.asarray(a.image.plan)
            _check_marginals(v, tol)
            vcos = feats.image_local[0] @ index.image_local[index.image_rows[row]].astype(np.float32).T
            assert float((v * vcos).sum()) == pytest.approx(a.visual_term, abs=1e-5)
            assert (a.text_term + a.visual_term) / 2 == pytest.approx(a.rerank_score, abs=1e-5)
        else:
            assert a.image is None and a.visual_term is None
            assert a.text_term == pytest.approx(a.rerank_score, abs=1e-6)
    assert any(a.image is not None for a in res.explain)


def test_adaptive_rerank_explains_only_what_it_solved(linker, monkeypatch) -> None:
    """With EL_RERANK__SKIP_MARGIN a skipped mention has no plan (its OT term is 0); a solved one in the same batch
    gets the plans of its own solve (the sub-batch's recorder is merged back at the right position)."""
    import service.pipeline.linker as linker_mod

    qs = [LinkQuery("Berlin", "Berlin in 1920", None, top_k=3, explain=True),
          LinkQuery("Douglas Adams", "Douglas Adams wrote books.", None, top_k=3, explain=True)]
    full = linker.link_batch(qs).results
    monkeypatch.setattr(linker_mod, "top_margin", lambda scores, rows: np.array([np.inf, -np.inf]))
    part = linker.with_skip_margin(0.5).link_batch(qs).results
    assert all(a.text is None and a.rerank_score == 0.0 for a in part[0].explain)
    for a, b in zip(part[1].explain, full[1].explain):
        assert a.id == b.id and a.text is not None
        np.testing.assert_allclose(np.asarray(a.text.plan), np.asarray(b.text.plan), atol=1e-6)
        assert a.rerank_score == pytest.approx(b.rerank_score, abs=1e-6)
