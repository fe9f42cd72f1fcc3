"""`el tune-weights` without the pipeline: the ranking rule of its metrics and the listwise fit, on planted scores."""

from __future__ import annotations

import numpy as np
import pytest

from service.cli import main
from service.offline.tuning import FIELDS, fit, metrics


def test_metrics_rank_ties_behind_earlier_candidates_and_count_unretrieved_golds_as_misses() -> None:
    scores = np.zeros((3, 3, len(FIELDS)), np.float32)
    scores[0, :, 0] = [0.5, 0.5, 0.1]  # gold (candidate 1) tied with candidate 0: ranks 2, as the stable sort has it
    scores[1, :, 0] = [0.2, 0.9, 0.1]  # gold first
    scores[2, 2] = np.nan  # only two candidates; the gold was not retrieved
    gold = np.array([1, 1, -1])
    w = (1.0,) + (0.0,) * (len(FIELDS) - 1)
    assert metrics(scores, gold, w) == pytest.approx({"h@1": 1 / 3, "mrr": (0.5 + 1.0 + 0.0) / 3})


def _planted(rng: np.random.Generator, w_true: np.ndarray, n: int = 3000, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose gold is drawn from softmax(4 * scores @ w_true) over the candidates."""
    x = rng.normal(size=(n, k, len(FIELDS))).astype(np.float32)
    logits = 4.0 * x @ w_true
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gold = np.array([rng.choice(k, p=row) for row in p])
    return x, gold


def test_fit_recovers_planted_weights_and_keeps_fixed_ones() -> None:
    rng = np.random.default_rng(0)
    w_true = np.zeros(len(FIELDS))
    w_true[:3] = [1.0, 0.6, -0.4]  # retrieval, OT, one more term; the rest carry nothing
    data = {"a": _planted(rng, w_true), "b": _planted(rng, w_true)}
    w = fit(data, {})
    assert w[0] == 1.0  # the retrieval weight is the unit
    np.testing.assert_allclose(w, w_true, atol=0.12)
    fixed = fit(data, {1: 0.25})
    assert fixed[0] == 1.0 and fixed[1] == 0.25
    # Fitted weights rank the planted golds better than the retrieval score alone.
    retrieval_only = (1.0,) + (0.0,) * (len(FIELDS) - 1)
    assert metrics(*data["a"], tuple(w))["mrr"] > metrics(*data["a"], retrieval_only)["mrr"] + 0.05


def test_tune_weights_is_an_el_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["tune-weights", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--split", "--limit", "--ot-weight", "datasets"):
        assert flag in out
