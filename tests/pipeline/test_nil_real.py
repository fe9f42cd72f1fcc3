"""The NIL protocol's exclusion with the real pipeline (real encoders, a real index of about 400 entities)."""

from __future__ import annotations

import pytest

from service.pipeline.types import LinkQuery

pytestmark = [pytest.mark.slow, pytest.mark.onnx]


def test_excluded_entities_never_answer_and_the_rest_is_unchanged(linker, test_mentions) -> None:
    mentions = [m for m in test_mentions if m.answer in linker.index.row_of][:12]
    queries = [LinkQuery(m.mention, m.context, top_k=5) for m in mentions]
    before = linker.link_batch(queries).results
    removed = {m.answer for m in mentions[:6]}
    after = linker.with_excluded(removed).link_batch(queries).results
    assert linker.excluded == frozenset()  # the served linker is untouched
    assert any(r.entities[0].id in removed for r in before)
    for b, a in zip(before, after):
        assert not {e.id for e in a.entities} & removed
        assert 0.0 <= a.confidence <= 1.0
        # what is left keeps its scores (a candidate is scored on its own) and so its order
        old = {e.id: e.score for e in b.entities}
        common = [e for e in a.entities if e.id in old]
        assert [e.score for e in common] == pytest.approx([old[e.id] for e in common], abs=1e-4)
        assert [e.id for e in common] == [e.id for e in b.entities if e.id in {c.id for c in common}]
    assert sum(len([e for e in a.entities if e.id in {x.id for x in b.entities}]) for a, b in zip(after, before)) > 12


def test_fit_calibration_on_labelled_mentions_of_ones_own_kg(linker, test_mentions, tmp_path) -> None:
    """The refit path for another KG (`el fit-calibration --mentions`): labelled mentions, real pipeline, a JSON
    that the Linker then serves with (EL_CALIBRATION__PATH)."""
    import json

    from service.offline.calibration import run_fit
    from service.offline.nil_protocol import FIT_SEEDS
    from service.pipeline.calibration import Calibration
    from service.pipeline.linker import load_verdict

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"mention": m.mention, "context": m.context, "answer": m.answer}) + "\n"
                            for m in test_mentions[:40]))
    cal = run_fit(linker, linker.settings.data_dir, [], files=[path])
    assert cal.fitted_for["splits"] == ["mine labelled"] and cal.model_version == linker.model_version
    assert cal.fitted_for["nil_protocol"]["fit_seeds"] == list(FIT_SEEDS)  # the answerable fit saw every draw
    assert 0.0 < cal.nil_threshold < 1.0 or cal.nil_threshold == 0.0
    assert set(cal.report) == {"in_sample", "cross_fitted", "platt_top_score_only_ece"}
    cal.save(tmp_path / "cal.json")
    settings = linker.settings.model_copy(update={"calibration": linker.settings.calibration.model_copy(
        update={"path": tmp_path / "cal.json"})})
    verdict = load_verdict(settings, linker.model_version)
    assert verdict.calibration == Calibration.load(tmp_path / "cal.json")
    served = linker.with_excluded(frozenset())
    served.verdict = verdict
    r = served.link(LinkQuery(test_mentions[0].mention, test_mentions[0].context, top_k=3))
    assert r.confidence is not None and 0.0 <= r.confidence <= 1.0
