"""Choose the rerank score weights on dev splits (`el tune-weights`): one pass through the served pipeline per split
collects every score of every reranked candidate (retrieval, OT, the name terms and the KG-consistency terms), then a
listwise softmax (cross-entropy of the gold among the candidates, each split weighing the same) fits the weights.
`el tune-weights` prints H@1 and MRR per split with the current and the fitted weights, and the settings to use.

    .venv/bin/el tune-weights --split dev --ot-weight 1.0 wikimel richpedia wikidiverse

The retrieval weight stays 1.0 (only ratios matter; a free temperature absorbs the scale); `--ot-weight 1.0`
fixes the OT weight too, so that retrieval + OT stays OT-MEL's overall score and only the other terms are fitted.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm import tqdm

from kg_index.build import load_entity_image
from kg_index.readers import read_mentions
from models.rank_metrics import rank_metrics
from service.pipeline.linker import Linker
from service.pipeline.terms import TERMS
from service.pipeline.types import LinkQuery

logger = logging.getLogger(__name__)

FIELDS = ("retrieval_score", *(t.field for t in TERMS))  # score columns, in this order
WEIGHTS = ("retrieval_weight", *(t.weight for t in TERMS))


def collect(linker: Linker, dataset: str, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """scores [M, K, len(FIELDS)] (NaN where no candidate) and gold [M] (candidate index or -1)."""
    s = linker.settings
    k = s.rerank.candidates
    mentions = read_mentions(s.data_dir, dataset, split)[:limit]
    scores = np.full((len(mentions), k, len(FIELDS)), np.nan, np.float32)
    gold = np.full(len(mentions), -1)
    for i in tqdm(range(0, len(mentions), 64), desc=f"{dataset} {split}", unit="batch"):
        chunk = mentions[i : i + 64]
        out = linker.link_batch([LinkQuery(m.mention, m.context, load_entity_image(m.image), top_k=k) for m in chunk])
        for j, (m, r) in enumerate(zip(chunk, out.results)):
            for c, cand in enumerate(r.entities):
                scores[i + j, c] = [getattr(cand, f) or 0.0 for f in FIELDS]
                if cand.id == m.answer:
                    gold[i + j] = c
    return scores, gold


def fit(data: dict[str, tuple[np.ndarray, np.ndarray]], fixed: dict[int, float]) -> np.ndarray:
    """Weights (retrieval 1.0, `fixed` columns as given) minimising the mean over splits of the listwise
    cross-entropy of the gold candidate; a free temperature sets the scale."""
    free = [c for c in range(1, len(FIELDS)) if c not in fixed]
    w_free = torch.zeros(len(free), dtype=torch.float64, requires_grad=True)
    log_temp = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    splits = []
    for scores, gold in data.values():
        keep = gold >= 0  # a mention whose gold was not retrieved says nothing about the weights
        x = torch.from_numpy(np.nan_to_num(scores[keep], nan=0.0)).double()
        splits.append((x, torch.from_numpy(~np.isnan(scores[keep, :, 0])), torch.from_numpy(gold[keep])))

    def weights() -> torch.Tensor:
        w = torch.zeros(len(FIELDS), dtype=torch.float64)
        w[0] = 1.0
        for c, v in fixed.items():
            w[c] = v
        return w.index_put((torch.tensor(free),), w_free) if free else w

    opt = torch.optim.LBFGS([w_free, log_temp], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = weights()
        loss = sum(torch.nn.functional.cross_entropy((log_temp.exp() * (x @ w)).masked_fill(~valid, -1e9), g)
                   for x, valid, g in splits) / len(splits)
        loss.backward()
        return loss

    opt.step(closure)
    return weights().detach().numpy()


def metrics(scores: np.ndarray, gold: np.ndarray, w: tuple[float, ...]) -> dict[str, float]:
    final = np.nan_to_num(scores @ np.asarray(w, np.float32), nan=-np.inf)
    idx = np.arange(len(gold))
    g = final[idx, np.maximum(gold, 0)]
    # Ties go to the earlier candidate (retrieval order), as the served stable sort does.
    earlier = np.arange(final.shape[1])[None, :] < gold[:, None]
    ahead = (final > g[:, None]) | ((final == g[:, None]) & earlier)
    return rank_metrics(np.where(gold >= 0, 1 + ahead.sum(1), 0))


def tune(linker: Linker, datasets: list[str], split: str = "dev", *, limit: int | None = None,
         ot_weight: float | None = None) -> dict:
    """{"candidates": reranked candidates per mention, "recall": the share of mentions whose gold is among them, per
    dataset, "rows": H@1 and MRR per dataset with the current and the fitted weights, "settings": the fitted weights
    as EL_RERANK__ variables}."""
    data = {ds: collect(linker, ds, split, limit) for ds in datasets}
    recall = {ds: float(np.mean(gold >= 0)) for ds, (_, gold) in data.items()}
    current = np.array([getattr(linker.rerank, w) for w in WEIGHTS])
    fitted = fit(data, {} if ot_weight is None else {1: ot_weight}).round(3)
    rows = []
    for label, w in (("current", current), ("fitted", fitted)):
        per = {ds: {k: round(v, 4) for k, v in metrics(s, g, tuple(w)).items()} for ds, (s, g) in data.items()}
        rows.append({"weights": label, **dict(zip(WEIGHTS, w.tolist())),
                     "mean_mrr": round(float(np.mean([m["mrr"] for m in per.values()])), 4), **per})
    logger.info("fitted on %s %s: mean MRR %.4f (current weights %.4f)", "+".join(datasets), split,
                rows[1]["mean_mrr"], rows[0]["mean_mrr"])
    settings = " ".join(f"EL_RERANK__{k.upper()}={v:g}" for k, v in zip(WEIGHTS, fitted) if k != "retrieval_weight")
    return {"candidates": linker.settings.rerank.candidates, "recall": recall, "rows": rows, "settings": settings}
