"""Respond stage: mix the scores, order the candidates, apply the NIL rule."""

from __future__ import annotations

import numpy as np

from kg_index.load import KGIndex
from service.pipeline.types import Candidate, LinkQuery, LinkResult


def build_results(index: KGIndex, queries: list[LinkQuery], rows: np.ndarray, terms: dict[str, np.ndarray],
                  final: np.ndarray, *, nil_threshold: float, model_version: str) -> list[LinkResult]:
    """terms: each score the candidates carry, by Candidate field name ([B, K]; retrieval_score always)."""
    results = []
    for i, q in enumerate(queries):
        order = [j for j in np.argsort(-final[i], kind="stable") if rows[i, j] >= 0][: q.top_k]
        cands = []
        for j in order:
            meta = index.entities[rows[i, j]]
            scores = {field: float(values[i, j]) for field, values in terms.items()}
            cands.append(Candidate(id=meta.id, name=meta.name, score=float(final[i, j]), **scores))
        nil = not cands or cands[0].score < nil_threshold
        results.append(LinkResult(q.mention, cands, nil, index.version, model_version, id=q.id))
    return results
