"""The calibrated confidence and the NIL verdict (service/pipeline/calibration.py) and their fitting
(service/offline/calibration.py): features, the logistic fit, ECE, the shipped JSON's round trip, the rules."""

from __future__ import annotations

import numpy as np
import pytest

from service.offline.calibration import Scored, SplitPair, cross_fit, ece, fit_logistic, fit_models, reliability
from service.pipeline.calibration import (
    ENTITY_FEATURES,
    FEATURES,
    SCORE_FIELDS,
    Calibration,
    LogisticModel,
    Verdict,
    entity_facts,
    features,
)

TOP = FEATURES.index("top")


def _facts(n: int) -> np.ndarray:
    return np.zeros((n, len(ENTITY_FEATURES)))


def _cands(scores: list[list[float]]) -> np.ndarray:
    """Score tables [B, K, F] with the final scores given (NaN for a missing candidate) and the other fields 0."""
    k = max(len(s) for s in scores)
    out = np.full((len(scores), k, len(SCORE_FIELDS)), np.nan, np.float32)
    for i, s in enumerate(scores):
        out[i, : len(s)] = 0.0
        out[i, : len(s), 0] = s
    return out


def test_ece_on_toy_cases() -> None:
    assert ece(np.full(10, 0.9), np.array([1] * 9 + [0])) == pytest.approx(0.0)
    assert ece(np.ones(4), np.array([1, 0, 0, 0])) == pytest.approx(0.75)
    # two bins: 0.2 said, 0.5 right (0.3 off) and 0.8 said, all right (0.2 off), half the mentions each
    p = np.array([0.2, 0.2, 0.8, 0.8])
    assert ece(p, np.array([1, 0, 1, 1])) == pytest.approx(0.25)
    assert [r["n"] for r in reliability(p, np.array([1, 0, 1, 1]))] == [2, 2]


def test_logistic_fit_is_calibrated_where_the_raw_score_is_not() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6000, len(FEATURES)))
    p_true = 1 / (1 + np.exp(-(3 * x[:, TOP] + 1.5)))
    y = rng.random(6000) < p_true
    fitted = fit_logistic(x[:3000], y[:3000], np.ones(3000), names=("top", "margin"))
    held = fitted.predict(x[3000:])
    assert ece(held, y[3000:]) < 0.03
    overconfident = 1 / (1 + np.exp(-(9 * x[3000:, TOP] + 1.5)))  # the right order, the wrong probabilities
    assert ece(overconfident, y[3000:]) > 0.06
    assert fitted.coef[0] > 0 and abs(fitted.coef[1]) < 0.2  # margin is noise here


def test_weights_and_degree_two() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, len(FEATURES)))
    y = x[:, TOP] ** 2 > 1  # not separable by a line in `top`, separable by its square
    linear = fit_logistic(x, y, np.ones(4000), names=("top",))
    square = fit_logistic(x, y, np.ones(4000), names=("top",), degree=2, l2=0.1)
    assert len(square.coef) == 2
    def acc(m: LogisticModel) -> float:
        return float(((m.predict(x) > 0.5) == y).mean())

    assert acc(square) > 0.95
    assert acc(linear) < 0.8


def test_fit_converges_where_a_full_newton_step_diverges() -> None:
    """Heavy-tailed features (like log margins): from zero, plain Newton overshoots and its coefficients blow up
    (to ~1e11 on this draw); the backtracking step reaches the optimum, where the penalised gradient is zero."""
    rng = np.random.default_rng(1)
    x = rng.standard_cauchy(size=(3000, len(FEATURES)))
    y = rng.random(3000) < 1 / (1 + np.exp(-(2 * np.clip(x[:, 0], -5, 5) + np.clip(x[:, 1], -5, 5))))
    m = fit_logistic(x, y, np.ones(3000), degree=2, l2=0.1, names=FEATURES[:6])
    a = np.concatenate([np.ones((3000, 1)), m.design(x)], 1)
    beta = np.array([m.intercept, *m.coef])
    p = 1 / (1 + np.exp(-np.clip(a @ beta, -40, 40)))
    grad = a.T @ (p - y) + np.r_[0.0, np.full(len(m.coef), 0.1)] * beta
    assert np.abs(beta).max() < 1e3
    assert np.abs(grad).max() < 1e-4 * len(y)
    assert ((m.predict(x) > 0.5) == y).mean() > 0.8


def _scored(rng: np.random.Generator, n: int, no_answer: np.ndarray) -> Scored:
    """A toy NIL run: the answerable mentions' top candidate leads by a wide margin, the NIL ones' barely."""
    lead = np.where(no_answer, rng.normal(0.02, 0.02, n), rng.normal(0.15, 0.05, n))
    scores = _cands([[0.5, 0.5 - d, 0.1] for d in lead])
    return Scored("toy dev nil", np.array(["Kennedy"] * n), scores, np.where(no_answer, -1, 0), no_answer,
                  np.zeros((n, len(ENTITY_FEATURES))))


def test_answerable_model_is_fitted_on_every_draw_of_removals() -> None:
    rng = np.random.default_rng(3)
    n = 400
    draws = [rng.random(n) < 0.2 for _ in range(3)]
    full = Scored("toy dev", np.array(["Kennedy"] * n), _cands([[0.5, 0.3, 0.1]] * n), np.zeros(n, int),
                  np.zeros(n, bool), np.zeros((n, len(ENTITY_FEATURES))))
    pair = SplitPair(full, _scored(rng, n, draws[0]), [_scored(rng, n, d) for d in draws[1:]])
    assert len(pair.nil_all.gold) == 3 * n and pair.today_all.shape == (3 * n,)
    assert pair.nil_all.no_answer.tolist() == np.concatenate(draws).tolist()
    half = pair.subset(np.arange(n) < n // 2)
    assert len(half.draws) == 2 and all(len(d.gold) == n // 2 for d in half.draws)
    _, answerable, threshold = fit_models([pair])
    p = answerable.predict(pair.nil.features())
    assert ((p < threshold) == draws[0]).mean() > 0.9  # the margin separates them, the fit found it
    assert set(cross_fit([pair])) == {"toy dev"}


def test_mention_shape_features() -> None:
    names = ["parliament", "200 m", "NASA", "John F. Kennedy", "Kennedy", "Sun Yat-sen"]
    f = dict(zip(FEATURES, features(names, _cands([[0.5, 0.1]] * len(names)), _facts(len(names))).T))
    assert f["mention_lower"].tolist() == [1, 0, 0, 0, 0, 0]
    assert f["mention_digit"].tolist() == [0, 1, 0, 0, 0, 0]
    assert f["mention_upper"].tolist() == [0, 0, 1, 0, 0, 0]
    assert f["mention_title"].tolist() == [0, 0, 1, 1, 1, 1]
    assert f["mention_words"].tolist() == [1, 2, 1, 3, 1, 2]
    assert f["mention_chars"].tolist() == pytest.approx([1.0, 0.5, 0.4, 1.5, 0.7, 1.1])
    assert features([], _cands([[0.5]])[:0], _facts(0)).shape == (0, len(FEATURES))


def test_top_candidate_facts() -> None:
    from kg_index.load import EntityMeta

    dated = EntityMeta("Q1", "John F. Kennedy", "Sex: male. Birth: 1917, Brookline. Death: 1963, Dallas.", False)
    stated = EntityMeta("Q2", "Acme", "", False, start_year=1990)  # the KG's own year, no description
    bare = EntityMeta("Q3", "Kennedy", "", False)
    long = EntityMeta("Q4", "Long", "x" * 5000, False)
    f = entity_facts([dated, stated, bare, long, None])
    assert f.tolist() == [[1.0, len(dated.description) / 100, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0],
                          [1.0, 5.0, 0.0], [0.0, 0.0, 0.0]]
    x = dict(zip(FEATURES, features(["a"] * 5, _cands([[0.5, 0.1]] * 5), f).T))
    assert x["top_dated"].tolist() == [1, 1, 0, 0, 0] and x["top_description_len"][3] == 5.0


def test_features_pad_a_lone_candidate_and_read_served_order() -> None:
    x = features(["Kennedy", "John F. Kennedy"], _cands([[0.5], [0.6, 0.2, 0.1]]), _facts(2))
    assert x.shape == (2, len(FEATURES))
    f = dict(zip(FEATURES, x.T))
    assert f["top"].tolist() == pytest.approx([0.5, 0.6])
    assert f["margin"][1] == pytest.approx(0.4) and f["margin"][0] > 10  # no second candidate: a huge margin
    assert f["one_token"].tolist() == [1.0, 0.0]


def _calibration(threshold: float = 0.5) -> Calibration:
    conf = LogisticModel(["top"], [0.0], [1.0], [10.0], 0.0)  # P(right) = sigmoid(10 x top)
    answerable = LogisticModel(["margin"], [0.0], [1.0], [20.0], -2.0)  # P(answerable) = sigmoid(20 margin - 2)
    return Calibration(conf, answerable, threshold, "model@x", {"splits": ["wikimel dev"]}, {"ece": 0.01})


def test_calibration_round_trip(tmp_path) -> None:
    cal = _calibration()
    cal.save(tmp_path / "c.json")
    back = Calibration.load(tmp_path / "c.json")
    cands = _cands([[0.3, 0.25], [-0.1, -0.5]])
    for a, b in zip(cal.assess(["a", "b"], cands, _facts(2)), back.assess(["a", "b"], cands, _facts(2))):
        np.testing.assert_allclose(a, b)
    assert back.model_version == "model@x" and back.fitted_for == {"splits": ["wikimel dev"]}


def test_verdict_rules() -> None:
    cands = _cands([[0.3, 0.25], [0.2, -0.3]])
    conf, nil = Verdict(_calibration(0.5)).judge(["a", "b"], cands, _facts(2))
    # margins 0.05 and 0.5: P(answerable) sigmoid(-1) = 0.27 < 0.5 (nil), sigmoid(8) (not nil)
    assert nil == [True, False]
    assert conf == pytest.approx([1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(-2.0))])
    assert Verdict(_calibration(0.5), threshold=0.2).judge(["a", "b"], cands, _facts(2))[1] == [False, False]
    # the deprecated rule: the top final score against EL_NIL_THRESHOLD; confidence is still given
    conf2, nil2 = Verdict(_calibration(), rule="score_threshold", score_threshold=0.25).judge(["a", "b"], cands, _facts(2))
    assert nil2 == [False, True] and conf2 == conf
    # no candidate: nil, confidence null, under either rule; no calibration: confidence null
    empty = np.full((1, 2, len(SCORE_FIELDS)), np.nan, np.float32)
    assert Verdict(_calibration()).judge(["x"], empty, _facts(1)) == ([None], [True])
    assert Verdict(None, score_threshold=0.0).judge(["a", "b"], cands, _facts(2)) == ([None, None], [False, False])


def test_nil_threshold_alone_selects_the_old_rule(monkeypatch) -> None:
    from service.settings import Settings

    assert Settings().calibration.nil_rule == "calibrated"
    monkeypatch.setenv("EL_NIL_THRESHOLD", "0.3")
    assert Settings().calibration.nil_rule == "score_threshold"
    monkeypatch.setenv("EL_CALIBRATION__NIL_RULE", "calibrated")
    assert Settings().calibration.nil_rule == "calibrated"
