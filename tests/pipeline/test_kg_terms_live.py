"""KG terms of a live index: the base's terms plus runs over the appended rows (LayeredKGTerms) score every
candidate as terms over the whole list would (name tokens and dates exactly; the description overlap with the
base's IDF)."""

from __future__ import annotations

import numpy as np

from kg_index.load import EntityMeta
from service.pipeline.kg_terms import KGTerms, LayeredKGTerms

BASE = [
    EntityMeta("Q1", "Henry Wilson", "Sex: male. Birth: 1812. Death: 1875. Occupation: politician.", False, 1812, 1875),
    EntityMeta("Q2", "Harold Wilson", "Occupation: prime minister. Educated: Jesus College Oxford.", False, 1916, 1995),
    EntityMeta("Q3", "Paris", "Country: France. Capital of France.", False),
    EntityMeta("Q4", "Berlin", "Country: Germany.", False),
]
NEW = [EntityMeta(f"N{i}", f"Wilson Number{i}", f"Occupation: painter {i}. Educated: Eton College.", False,
                  1900 + 10 * i, 1950 + 10 * i) for i in range(9)]


def test_layered_terms_match_terms_over_everything() -> None:
    base = KGTerms(BASE)
    terms = None
    for i in range(1, len(NEW) + 1):  # one change at a time: runs are made and merged as a binary counter
        terms = LayeredKGTerms.extended(base, terms, NEW[:i])
    assert terms is not None and 1 < len(terms.runs) <= 4 and sum(len(t.entities) for _, t in terms.runs) == 9
    whole = KGTerms(BASE + NEW)
    mentions = ["Wilson", "Wilson Number3", "Harold Wilson"]
    contexts = ["Wilson at Eton College in 1944", "the painter in 1925", "Wilson in 1964 at Jesus College"]
    rows = np.array([[0, 1, 4, 9, 12], [7, 2, -1, 5, 0], [1, 11, 12, 3, -1]])
    got, want = terms.score(mentions, contexts, rows), whole.score(mentions, contexts, rows)
    for field in ("name_tokens_score", "before_birth_score", "after_death_score"):
        np.testing.assert_array_equal(got[field], want[field], err_msg=field)
    assert got["name_tokens_score"][1, 0] == 1.0
    assert got["before_birth_score"][0, 3] == 1.0  # N5, born 1950, is not in a 1944 photo
    # The same words found (the weights differ: the IDF is the base's, computed over its 4 entities, not 13)
    overlap_got, overlap_want = got["description_overlap_score"], want["description_overlap_score"]
    assert ((overlap_got > 0) == (overlap_want > 0)).all() and (overlap_got > 0).sum() >= 4
