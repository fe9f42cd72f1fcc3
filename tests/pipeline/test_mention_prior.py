"""The mention prior (service/pipeline/mention_prior.py) and the answerable model's facts built with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kg_index.load import EntityMeta
from service.pipeline.calibration import FACT_FEATURES, FEATURES, SCORE_FIELDS, features, mention_facts
from service.pipeline.mention_prior import PRIOR_FEATURES, MentionPrior, prior_path, surface_form

PAIRS = [("Paris", "Q90"), ("paris ", "Q90"), ("PARIS", "Q167646"), ("Paris  Hilton", "Q47899"), ("Obama", "Q76")]


def test_forms_keep_their_most_frequent_entities_first(tmp_path: Path) -> None:
    prior = MentionPrior.from_mentions(PAIRS, ["test"])
    assert surface_form("  Paris   HILTON ") == "paris hilton"
    assert prior.table["paris"] == [("Q90", 2), ("Q167646", 1)]
    prior.save(tmp_path / "p.json")
    assert MentionPrior.load(tmp_path / "p.json").table == prior.table
    assert prior_path(tmp_path / "calibration.json") == tmp_path / "calibration.prior.json"


def test_features_say_when_the_usual_entity_is_missing_from_the_kb() -> None:
    prior = MentionPrior.from_mentions(PAIRS)
    kb = {"Q90", "Q47899"}  # Obama (Q76) is not in this KB
    x = prior.features(["Paris", "Obama", "Berlin", "Paris"], ["Q90", "Q1", "Q64", "Q167646"], kb.__contains__)
    ln = np.log1p  # the last column: training mentions linked to the served top, under any form
    np.testing.assert_allclose(x, [[1, 0, 1, ln(2)],  # known form, its entity here and on top ("Paris", "paris ")
                                  [1, 1, 0, 0],  # known form, its entity missing: the NIL signal; the top never linked
                                  [0, 0, 0, 0],  # a form the prior never saw
                                  [1, 0, 0, ln(1)]])  # known, present, but another entity on top (linked once, as "PARIS")
    assert prior.links["Q47899"] == 1  # a form never seen, a top linked under another form:
    np.testing.assert_allclose(prior.features(["Hilton"], ["Q47899"], kb.__contains__), [[0, 0, 0, ln(1)]])


def test_a_kb_that_lacks_most_of_the_priors_entities_gets_no_prior_features() -> None:
    """Ids of its own, or a narrow slice: "missing from the KB" would mean nothing, or mislead."""
    prior = MentionPrior.from_mentions(PAIRS)  # usual entities: Q90 (paris), Q47899, Q76
    tops = [EntityMeta("e1", "Paris", "capital of France", False, None, None), None]
    other = mention_facts(["Paris", "Obama"], tops, prior, {"e1", "e2"}.__contains__, "v1", 2)
    assert other.shape == (2, len(FACT_FEATURES)) and not other[:, -len(PRIOR_FEATURES):].any()
    assert not prior.applies("v1+3", {"Q90", "Q1", "Q2"}.__contains__, 3)  # 1 of 3: decided once per base index
    kb = {"Q90", "Q47899", "Q167646"}  # 2 of the 3 usual entities
    same = mention_facts(["Obama"], [None], prior, kb.__contains__, "v2", len(kb))
    assert same[0, -len(PRIOR_FEATURES):].tolist() == [1, 1, 0, 0]
    assert not mention_facts(["Obama"], [None], None, bool, "v3", 1)[0, -len(PRIOR_FEATURES):].any()


def test_features_read_the_prior_columns_and_pad_old_facts() -> None:
    cands = np.zeros((1, 3, len(SCORE_FIELDS)), np.float32)
    cands[:, :, 0] = [[0.9, 0.5, 0.1]]
    with_prior = np.array([[1.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.5]])
    x = features(["Obama"], cands, with_prior)
    assert [x[0, FEATURES.index(f)] for f in PRIOR_FEATURES] == [1.0, 1.0, 0.0, 0.5]
    x_old = features(["Obama"], cands, with_prior[:, :3])  # entity facts alone (an older caller): no prior
    assert not any(x_old[0, FEATURES.index(f)] for f in PRIOR_FEATURES)
