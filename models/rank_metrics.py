"""Rank metrics of entity linking, from the 1-based rank of each mention's gold entity (0: not ranked, a miss).

The one implementation behind evaluation (service/offline/evaluation.py), rerank-weight tuning
(service/offline/tuning.py) and training's dev metric (models/train.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def rank_metrics(ranks: Sequence[int] | np.ndarray, ks: Iterable[int] = (1,)) -> dict[str, float]:
    """{"h@k": share of mentions whose gold ranks k or better, for each k in ks, "mrr": mean reciprocal rank}.

    Unrounded; a miss (rank 0) counts 0 in both; no mentions give 0.0 throughout."""
    r = np.asarray(ranks)
    if not len(r):
        return {**{f"h@{k}": 0.0 for k in ks}, "mrr": 0.0}
    out = {f"h@{k}": float(np.mean((r > 0) & (r <= k))) for k in ks}
    out["mrr"] = float(np.mean(np.where(r > 0, 1.0 / np.maximum(r, 1), 0.0)))
    return out
