"""The one rank-metrics function (evaluation, weight tuning and training's dev metric all call it)."""

from __future__ import annotations

import numpy as np
import pytest

from models.rank_metrics import rank_metrics


def test_hits_and_mrr_from_ranks_with_misses() -> None:
    m = rank_metrics([1, 2, 0, 5, 3], ks=(1, 3, 5))
    assert m["h@1"] == pytest.approx(1 / 5)
    assert m["h@3"] == pytest.approx(3 / 5)
    assert m["h@5"] == pytest.approx(4 / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 0 + 1 / 5 + 1 / 3) / 5)
    assert list(m) == ["h@1", "h@3", "h@5", "mrr"]


def test_default_is_h1_and_mrr_and_numpy_ranks_work() -> None:
    assert rank_metrics(np.array([1, 1, 4])) == pytest.approx({"h@1": 2 / 3, "mrr": (2 + 0.25) / 3})


def test_no_mentions_give_zeros() -> None:
    assert rank_metrics([], ks=(1, 5)) == {"h@1": 0.0, "h@5": 0.0, "mrr": 0.0}
