"""The bf16 and int8 shortlists of exact retrieval with the real parts (real encoders, a real index of about 400
entities): the served answers are those of the fp32 search."""

from __future__ import annotations

import numpy as np
import pytest

from kg_index import exact
from kg_index.int8_scan import int8_usable
from service.pipeline.types import LinkQuery

pytestmark = [pytest.mark.slow, pytest.mark.onnx]


def test_served_links_are_the_same_with_the_bf16_shortlist_on_and_off(linker, test_mentions) -> None:
    queries = [LinkQuery(m.mention, m.context, top_k=10) for m in test_mentions]  # 60: past COARSE_MIN_BATCH
    before = exact._coarse_mode
    searcher = linker.index.exact
    assert searcher is not None and len(searcher) > 48 + exact.COARSE_EXTRA  # the small index leaves room for it
    try:
        exact.configure_coarse("off")
        want = linker.link_batch(queries).results
        exact.configure_coarse("on")
        researched, shortlisted = searcher.fp32_researches, searcher.shortlisted
        got = linker.link_batch(queries).results
    finally:
        exact.configure_coarse(before)
    assert searcher.shortlisted == shortlisted + len(queries)  # the shortlist did answer
    assert searcher.fp32_researches == researched  # and its rounding bound cleared on every real mention
    for w, g in zip(want, got):
        assert [e.id for e in g.entities] == [e.id for e in w.entities]
        np.testing.assert_allclose([e.retrieval_score for e in g.entities], [e.retrieval_score for e in w.entities],
                                   atol=1e-5)
        assert g.nil == w.nil


@pytest.mark.skipif(not int8_usable(), reason="FBGEMM's int8 products are not exact on this CPU")
@pytest.mark.parametrize("batch", [1, 8, 60])
def test_served_links_are_the_same_with_the_int8_shortlist_on_and_off(linker, test_mentions, batch: int) -> None:
    queries = [LinkQuery(m.mention, m.context, top_k=10) for m in test_mentions]
    searcher = linker.index.exact
    assert searcher is not None and len(searcher) > 48 + exact.INT8_EXTRA  # room for its shortlist
    before = exact._coarse_mode, exact._int8_mode
    try:
        exact.configure_int8("off")
        want = [r for i in range(0, len(queries), batch) for r in linker.link_batch(queries[i : i + batch]).results]
        exact.configure_int8("on")
        researched, shortlisted = searcher.fp32_researches, searcher.int8_shortlisted
        got = [r for i in range(0, len(queries), batch) for r in linker.link_batch(queries[i : i + batch]).results]
    finally:
        exact.configure_coarse(before[0])
        exact.configure_int8(before[1])
    assert searcher.int8_shortlisted == shortlisted + len(queries)  # the int8 shortlist did answer
    assert searcher.fp32_researches == researched  # and its bound cleared on every real mention
    for w, g in zip(want, got):
        assert [e.id for e in g.entities] == [e.id for e in w.entities]
        np.testing.assert_allclose([e.retrieval_score for e in g.entities], [e.retrieval_score for e in w.entities],
                                   atol=1e-5)
        assert g.nil == w.nil
