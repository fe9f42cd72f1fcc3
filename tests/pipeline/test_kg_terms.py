"""KG-consistency terms: dates, lifespans, name tokens and description overlap on hand-made entities."""

from __future__ import annotations

import numpy as np
import pytest

from kg_index.attributes import lifespan, lifespan_from_description
from kg_index.load import EntityMeta
from service.pipeline.kg_terms import KGTerms, after_death, before_birth, dated_spans


def test_dated_spans() -> None:
    assert dated_spans("Wilson with Sir Oliver Leese, Italy, 30 April 1944") == [(1944, 1944)]
    assert dated_spans("Flores, photographed c.1865") == [(1865, 1865)]
    assert dated_spans("Peter Struve, 1900s; again in 2013") == [(1900, 1909), (2013, 2013)]
    assert dated_spans("Dimitrios Voulgaris (1802-1878), 1850 \u2013 1860") == [(1802, 1878), (1850, 1860)]
    # Not years: longer numbers, negative numbers, out-of-range numbers.
    assert dated_spans("ran 12000 metres at -1944 and 999 and 3050") == []
    assert dated_spans("") == []


@pytest.mark.parametrize(
    ("spans", "start", "end", "before", "after"),
    [
        ([(1944, 1944)], 1812, 1875, False, True),  # died before the photo
        ([(1944, 1944)], 1881, 1964, False, False),
        ([(1954, 1954)], 1989, None, True, False),  # born after it
        ([(1954, 1954)], None, 1953, False, False),  # the year after death is allowed (posthumous release dates)
        ([(1900, 1909)], 1905, None, False, False),  # a decade meets a lifespan starting inside it
        ([(1802, 1878)], 1803, 1878, False, False),  # a stated lifespan one year off the KG's
        ([(1800, 1800), (2000, 2000)], 1950, None, False, False),  # any date in the lifespan clears the candidate
        ([(1800, 1800), (2000, 2000)], 1900, 1950, False, False),  # dates on both sides: neither rule holds
        ([], 1950, 2000, False, False),  # undated sentence
        ([(1944, 1944)], None, None, False, False),  # undated entity
    ],
)
def test_dates_against_the_lifespan(spans, start, end, before, after) -> None:
    assert before_birth(spans, start) is before and after_death(spans, end) is after


def test_lifespan_from_the_attribute_text() -> None:
    assert lifespan_from_description("Sex: male. Birth: -355, Pella. Death: -322, Babylon.") == (-355, -322)
    assert lifespan_from_description("Sex: female. Birth: 1983, Maine. Occupation: actor.") == (1983, None)
    assert lifespan_from_description("Occupation: actor. Notes: Birthday party 1990") == (None, None)
    assert lifespan(1850, None, "Birth: 1900") == (1850, None)  # the KG's own years win
    assert lifespan(None, None, "Birth: 1900") == (1900, None)


def _meta(id_: str, name: str, description: str) -> EntityMeta:
    return EntityMeta(id_, name, description, False, *lifespan_from_description(description))


def test_scores_per_candidate() -> None:
    kb = [
        _meta("Q1", "Henry Wilson", "Sex: male. Birth: 1812, Farmington. Death: 1875, Washington."),
        _meta("Q2", "Henry Maitland Wilson", "Sex: male. Birth: 1881, London. Death: 1964. Alma mater: Eton College."),
        _meta("Q3", "Wilsonia", "Occupation: plant."),
        _meta("Q4", "Eton", "Occupation: school."),
    ]
    terms = KGTerms(kb)
    rows = np.array([[0, 1, 2, -1], [3, 1, -1, -1]])
    got = terms.score(["Wilson", "Eton"], ["Wilson at Eton College, Italy 1944", ""], rows)
    np.testing.assert_array_equal(got["name_tokens_score"][0], [1, 1, 0, 0])  # "Wilsonia" only resembles the mention
    np.testing.assert_array_equal(got["after_death_score"][0], [1, 0, 0, 0])  # Q3 has no dates
    assert not got["before_birth_score"].any()
    overlap = got["description_overlap_score"][0]
    assert overlap[1] > 0 and overlap[0] == overlap[2] == overlap[3] == 0  # "eton", "college" in Q2 only
    assert 0 < overlap[1] < 1
    # No sentence: nothing dated, nothing to overlap; padding rows stay 0.
    assert not got["after_death_score"][1].any() and not got["description_overlap_score"][1].any()
    np.testing.assert_array_equal(got["name_tokens_score"][1], [1, 0, 0, 0])


def test_rarer_shared_words_weigh_more() -> None:
    kb = [_meta(f"Q{i}", f"P{i}", "Occupation: writer.") for i in range(20)]
    kb.append(_meta("Q98", "A", "Occupation: actor. Alma mater: Juilliard School."))
    kb.append(_meta("Q99", "B", "Occupation: actor."))
    terms = KGTerms(kb)
    got = terms.score(["X", "X"], ["an actor from Juilliard", "an actor"], np.array([[20], [21]]))["description_overlap_score"]
    assert got[0, 0] > got[1, 0] > 0
