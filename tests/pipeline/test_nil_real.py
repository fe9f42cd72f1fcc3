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
