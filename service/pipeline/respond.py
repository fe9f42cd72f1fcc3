"""Respond stage: order the candidates, attach the calibrated confidence and the NIL verdict."""

from __future__ import annotations

import numpy as np

from kg_index.load import KGIndex
from service.pipeline.calibration import SCORE_FIELDS, Verdict, mention_facts
from service.pipeline.types import Candidate, LinkQuery, LinkResult


def build_results(index: KGIndex, queries: list[LinkQuery], rows: np.ndarray, terms: dict[str, np.ndarray],
                  final: np.ndarray, *, verdict: Verdict, model_version: str,
                  excluded: frozenset[str] = frozenset()) -> list[LinkResult]:
    """terms: each score the candidates carry, by Candidate field name ([B, K]; retrieval_score always);
    excluded: ids answered as if not in the KB (the NIL protocol's, Linker.with_excluded)."""
    orders = [[j for j in np.argsort(-final[i], kind="stable") if rows[i, j] >= 0] for i in range(len(queries))]
    # every candidate's scores in served order (not only the top_k returned): what the calibration reads
    table = np.full((len(queries), rows.shape[1], len(SCORE_FIELDS)), np.nan, np.float32)
    values = {"score": final, **terms}
    for i, order in enumerate(orders):
        for c, f in enumerate(SCORE_FIELDS):
            table[i, : len(order), c] = values[f][i, order] if f in values else 0.0
    mentions = [q.mention for q in queries]
    row_of = index.row_of
    facts = mention_facts(mentions, [index.entities[rows[i, o[0]]] if o else None for i, o in enumerate(orders)],
                          verdict.prior, lambda e: e in row_of and e not in excluded, index.version, len(index))
    confidence, nil = verdict.judge(mentions, table, facts)
    results = []
    for i, q in enumerate(queries):
        cands = []
        for j in orders[i][: q.top_k]:
            meta = index.entities[rows[i, j]]
            scores = {field: float(v[i, j]) for field, v in terms.items()}
            cands.append(Candidate(id=meta.id, name=meta.name, score=float(final[i, j]), **scores))
        results.append(LinkResult(q.mention, cands, nil[i], index.version, model_version, id=q.id,
                                  confidence=confidence[i]))
    return results
