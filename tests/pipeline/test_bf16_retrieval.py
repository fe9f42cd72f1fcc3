"""The bf16 shortlist of exact retrieval with the real parts (real encoders, a real index of about 400 entities):
the served answers are those of the fp32 search."""

from __future__ import annotations

import numpy as np
import pytest

from kg_index import exact
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
