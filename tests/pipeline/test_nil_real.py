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
    from service.pipeline.mention_prior import prior_path

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"mention": m.mention, "context": m.context, "answer": m.answer}) + "\n"
                            for m in test_mentions[:40]))
    cal, prior = run_fit(linker, linker.settings.data_dir, [], files=[path])
    assert cal.fitted_for["splits"] == ["mine labelled"] and cal.model_version == linker.model_version
    assert cal.fitted_for["nil_protocol"]["fit_seeds"] == list(FIT_SEEDS)  # the answerable fit saw every draw
    assert 0.0 < cal.nil_threshold < 1.0 or cal.nil_threshold == 0.0
    assert set(cal.report) == {"in_sample", "cross_fitted", "platt_top_score_only_ece"}
    assert prior.table == {}  # the mention prior comes from the benchmarks' train splits: none for one's own KG
    cal.save(tmp_path / "cal.json")
    prior.save(prior_path(tmp_path / "cal.json"))
    settings = linker.settings.model_copy(update={"calibration": linker.settings.calibration.model_copy(
        update={"path": tmp_path / "cal.json"})})
    verdict = load_verdict(settings, linker.model_version)
    assert verdict.calibration == Calibration.load(tmp_path / "cal.json") and verdict.prior is not None
    served = linker.with_excluded(frozenset())
    served.verdict = verdict
    r = served.link(LinkQuery(test_mentions[0].mention, test_mentions[0].context, top_k=3))
    assert r.confidence is not None and 0.0 <= r.confidence <= 1.0


def test_the_shipped_prior_tells_the_nil_rule_when_a_mentions_usual_entity_is_gone(linker, test_mentions) -> None:
    """The mention prior shipped beside the calibration (models/weights/calibration.prior.json, from the benchmarks'
    train splits), cut to the names whose usual entity this small index holds (so that it covers them, as the
    benchmark KB covers the whole prior): with the usual entity of those mentions masked out of the KB, the served
    `nil` fires far more often than without the prior, and never for the same mentions with it in."""
    from dataclasses import replace

    from service.pipeline.mention_prior import MentionPrior, surface_form

    shipped = linker.verdict.prior
    assert shipped is not None and shipped.sources and len(shipped.table) > 10_000
    row_of = linker.index.row_of
    cut = MentionPrior({f: v for f, v in shipped.table.items() if v[0][0] in row_of}, shipped.sources)
    usual = [m for m in test_mentions if m.answer in row_of
             and (seen := cut.table.get(surface_form(m.mention))) and seen[0][0] == m.answer][:40]
    assert len(usual) >= 10
    queries = [LinkQuery(m.mention, m.context, top_k=3) for m in usual]
    served = linker.with_excluded(frozenset())
    served.verdict = replace(linker.verdict, prior=cut)
    kept = served.link_batch(queries).results
    gone = served.with_excluded({m.answer for m in usual}).link_batch(queries).results
    assert cut.applies(linker.index.version, row_of.__contains__, len(linker.index))
    blind = linker.with_excluded({m.answer for m in usual})
    blind.verdict = replace(linker.verdict, prior=None)  # the same rule, reading no prior
    said_nil_kept, said_nil_gone, said_nil_blind = (
        sum(r.nil for r in rs) / len(rs) for rs in (kept, gone, blind.link_batch(queries).results))
    assert said_nil_kept <= 0.1 and said_nil_gone >= 0.5, (said_nil_kept, said_nil_gone)
    assert said_nil_gone > said_nil_blind, (said_nil_gone, said_nil_blind)


def test_a_narrow_kb_gets_no_prior(linker, test_mentions) -> None:
    """The whole shipped prior against this 459-entity slice of the benchmark KB: it holds few of the entities the
    prior's names usually mean, so the prior does not apply and the served verdicts are those without it (with it,
    4 of the first 24 test mentions, all linked right, were called NIL: their name's usual entity is not here)."""
    from dataclasses import replace

    assert not linker.verdict.prior.applies(linker.index.version, linker.index.row_of.__contains__,
                                            len(linker.index))
    queries = [LinkQuery(m.mention, m.context, top_k=3) for m in test_mentions[:24]]
    blind = linker.with_excluded(frozenset())
    blind.verdict = replace(linker.verdict, prior=None)
    assert [r.nil for r in linker.link_batch(queries).results] == [r.nil for r in blind.link_batch(queries).results]


def test_the_prior_can_be_turned_off(linker) -> None:
    """EL_CALIBRATION__MENTION_PRIOR=false: the NIL rule reads no prior (its features are 0, as for a name the
    prior never saw)."""
    from service.pipeline.linker import load_verdict

    off = linker.settings.model_copy(update={"calibration": linker.settings.calibration.model_copy(
        update={"mention_prior": False})})
    assert load_verdict(linker.settings, linker.model_version).prior is not None
    assert load_verdict(off, linker.model_version).prior is None
