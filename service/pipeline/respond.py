"""Respond stage: mix the scores, order the candidates, apply the NIL rule."""

from __future__ import annotations

import numpy as np

from kg_index.load import KGIndex
from service.pipeline.types import Candidate, LinkQuery, LinkResult


def build_results(index: KGIndex, queries: list[LinkQuery], rows: np.ndarray, retrieval: np.ndarray,
                  ot: np.ndarray | None, names: np.ndarray | None, context: np.ndarray | None, final: np.ndarray, *,
                  nil_threshold: float,
                  model_version: str) -> list[LinkResult]:
    results = []
    for i, q in enumerate(queries):
        order = [j for j in np.argsort(-final[i], kind="stable") if rows[i, j] >= 0][: q.top_k]
        cands = []
        for j in order:
            meta = index.entities[rows[i, j]]
            cands.append(Candidate(
                id=meta.id, name=meta.name, score=float(final[i, j]), retrieval_score=float(retrieval[i, j]),
                rerank_score=None if ot is None else float(ot[i, j]),
                name_score=None if names is None else float(names[i, j]),
                context_name_score=None if context is None else float(context[i, j]),
            ))
        nil = not cands or cands[0].score < nil_threshold
        results.append(LinkResult(q.mention, cands, nil, index.version, model_version, id=q.id))
    return results
