"""The score-term registry (service/pipeline/terms.py) is the one list: settings, RerankConfig, the response
fields, the scorers' outputs, the mix, the evaluation's rows, the model card and the README all agree with it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

from kg_index.load import EntityMeta
from models.model_card import ROWS
from service.pipeline.kg_terms import KGTerms
from service.pipeline.linker import Snapshot
from service.pipeline.rerank import RerankConfig
from service.pipeline.strings import string_terms
from service.pipeline.terms import GROUPS, SOURCES, TERMS, ablations, fields_of, mix
from service.pipeline.types import Candidate, LinkQuery, OTStats
from service.schemas import EntityScore
from service.settings import RerankSettings, Settings
from service.settings_doc import render_terms
from tests.conftest import ROOT

FIELDS = [t.field for t in TERMS]
WEIGHTS = [t.weight for t in TERMS]


def test_registry_is_well_formed() -> None:
    assert len(set(FIELDS)) == len(FIELDS) and len(set(WEIGHTS)) == len(WEIGHTS)
    assert {t.source for t in TERMS} == set(SOURCES)
    assert {t.group for t in TERMS} == set(GROUPS)
    # Groups are contiguous in TERMS and in GROUPS order, so the ablation rows add terms in the mix's order.
    assert [g for i, g in enumerate(t.group for t in TERMS) if i == 0 or TERMS[i - 1].group != g] == list(GROUPS)


def test_every_weight_is_a_setting_and_every_weight_setting_a_term() -> None:
    weights = [name for name in RerankSettings.model_fields if name.endswith("_weight")]
    assert weights == ["retrieval_weight", *WEIGHTS]  # same order: the settings table lists them as TERMS does


def test_rerank_config_is_the_settings_and_has_no_defaults() -> None:
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(RerankConfig))
    with pytest.raises(TypeError):
        RerankConfig()
    settings = Settings(rerank={"name_weight": 0.3, "before_birth_weight": -1.5, "eps": 0.1})
    cfg = RerankConfig.from_settings(settings.rerank)
    for f in dataclasses.fields(RerankConfig):
        assert getattr(cfg, f.name) == getattr(settings.rerank, f.name), f.name
    assert (cfg.name_weight, cfg.before_birth_weight, cfg.eps) == (0.3, -1.5, 0.1)
    assert {"retrieval_weight", *WEIGHTS} <= {f.name for f in dataclasses.fields(RerankConfig)}


def test_response_fields_follow_the_registry_in_order() -> None:
    head = ["id", "name", "score", "retrieval_score"]
    assert [f.name for f in dataclasses.fields(Candidate)] == head + FIELDS
    assert list(EntityScore.model_fields) == head + FIELDS
    c = Candidate(id="Q1", name="A", score=1.0, retrieval_score=0.5, name_score=0.25)
    body = EntityScore(**c.__dict__).model_dump()
    assert list(body) == head + FIELDS and body["name_score"] == 0.25 and body["rerank_score"] is None


def _meta(entity_id: str, name: str, description: str = "", years: tuple[int | None, int | None] = (None, None)
          ) -> EntityMeta:
    return EntityMeta(id=entity_id, name=name, description=description, has_image=False, start_year=years[0],
                      end_year=years[1])


@dataclass
class FakeIndex:
    """Just what Snapshot.score_terms reads besides the cross scorer (a fake, not a KGIndex)."""

    entities: list[EntityMeta]


def _fake_cross(index, feats, rows, cfg, device, timings=None):
    """A fake cross scorer: the row number as its score, one solver report."""
    return np.where(rows >= 0, rows, 0).astype(np.float32), [OTStats(rows.size, 3, rows.size, 0.0)]


def test_each_source_computes_exactly_its_registered_terms() -> None:
    kb = [_meta("Q1", "Henry Wilson", "A senator", (1812, 1875)), _meta("Q2", "Eton", "A school in Berkshire")]
    rows = np.array([[0, 1], [1, -1]])
    queries = [LinkQuery("Wilson", "Wilson in 1944"), LinkQuery("Eton", "Eton in Berkshire")]
    kg = KGTerms(kb).score([q.mention for q in queries], [q.context for q in queries], rows)
    assert tuple(kg) == fields_of("kg")
    strings = string_terms([q.mention for q in queries], [q.context for q in queries],
                           [["Henry Wilson", "Eton"], ["Eton"]], rows.shape)
    assert tuple(strings) == fields_of("strings")
    snap = Snapshot(FakeIndex(kb), featurizer=None, cross=_fake_cross, kg_terms=KGTerms(kb))  # type: ignore[arg-type]
    values, stats = snap.score_terms(queries, None, rows, None, None)  # type: ignore[arg-type]
    assert sorted(values) == sorted(FIELDS) and all(v.shape == rows.shape for v in values.values())
    assert values["rerank_score"].tolist() == [[0, 1], [1, 0]] and stats[0].iterations == 3
    assert values["after_death_score"][0, 0] == 1.0 and values["name_score"][1, 1] == 0.0  # no candidate: 0


def test_mix_is_the_weighted_sum_of_every_term() -> None:
    cfg = RerankConfig.from_settings(RerankSettings())
    rng = np.random.default_rng(0)
    retrieval = rng.random((2, 3)).astype(np.float32)
    values = {f: rng.random((2, 3)).astype(np.float32) for f in FIELDS}
    want = cfg.retrieval_weight * retrieval + sum(getattr(cfg, t.weight) * values[t.field] for t in TERMS)
    np.testing.assert_allclose(mix(cfg, retrieval, values), want, atol=1e-6)
    zeroed = dataclasses.replace(cfg, **{w: 0.0 for w in WEIGHTS if w != "name_weight"})
    np.testing.assert_allclose(mix(zeroed, retrieval, values),
                               cfg.retrieval_weight * retrieval + cfg.name_weight * values["name_score"], atol=1e-6)


def test_ablation_rows_add_one_group_at_a_time_and_end_at_the_served_score() -> None:
    rows = ablations()
    assert list(rows) == ["retrieval+ot", "retrieval+ot+name", "retrieval+ot+name+kg"]
    assert set(rows["retrieval+ot"]) == set(WEIGHTS) - {"ot_weight"}
    assert set(rows["retrieval+ot+name"]) == {t.weight for t in TERMS if t.group == "kg"}
    assert rows["retrieval+ot+name+kg"] == {}
    assert all(v == 0.0 for zeroed in rows.values() for v in zeroed.values())


def test_model_card_and_readme_name_every_ablation_row() -> None:
    """models/ may not import service/, so the model card keeps its own row labels: they must cover the rows."""
    keys = [k for k, _ in ROWS]
    assert keys[keys.index("retrieval"): keys.index("retrieval") + 1 + len(ablations())] == ["retrieval", *ablations()]
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in ablations())
    assert render_terms() in readme, "terms table is stale: python -m service.settings_doc --write README.md"
