"""Choose the rerank score weights on a dev split: one pass through the served pipeline collects the
retrieval, OT and name scores of every reranked candidate, then a grid search picks the weights with the
best MRR. Prints the grid's best rows and the settings to use.

    .venv/bin/python scripts/tune_weights.py --dataset wikimel --split dev
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np
from tqdm import tqdm

from kg_index.build import load_entity_image
from kg_index.readers import read_mentions
from service.pipeline.linker import Linker
from service.pipeline.types import LinkQuery
from service.settings import Settings


def collect(linker: Linker, dataset: str, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """scores [M, K, 3] (retrieval, ot, name; NaN where no candidate) and gold [M] (candidate index or -1)."""
    s = linker.settings
    k = s.rerank.candidates
    mentions = read_mentions(s.data_dir, dataset, split)[:limit]
    scores = np.full((len(mentions), k, 3), np.nan, np.float32)
    gold = np.full(len(mentions), -1)
    for i in tqdm(range(0, len(mentions), 64), desc=f"{dataset} {split}", unit="batch"):
        chunk = mentions[i : i + 64]
        out = linker.link_batch([LinkQuery(m.mention, m.context, load_entity_image(m.image), top_k=k) for m in chunk])
        for j, (m, r) in enumerate(zip(chunk, out.results)):
            for c, cand in enumerate(r.entities):
                scores[i + j, c] = (cand.retrieval_score, cand.rerank_score or 0.0, cand.name_score or 0.0)
                if cand.id == m.answer:
                    gold[i + j] = c
    return scores, gold


def metrics(scores: np.ndarray, gold: np.ndarray, w: tuple[float, float, float]) -> dict[str, float]:
    final = np.nan_to_num(scores @ np.asarray(w, np.float32), nan=-np.inf)
    idx = np.arange(len(gold))
    g = final[idx, np.maximum(gold, 0)]
    rank = np.where(gold >= 0, 1 + (final > g[:, None]).sum(1), 0)
    rr = np.where(rank > 0, 1.0 / np.maximum(rank, 1), 0.0)
    return {"h@1": float(np.mean(rank == 1)), "mrr": float(rr.mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="wikimel")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    linker = Linker.from_settings(Settings())
    scores, gold = collect(linker, args.dataset, args.split, args.limit)
    grid = []
    for w_ot, w_name in itertools.product([0.0, 0.5, 1.0, 1.5, 2.0], [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]):
        grid.append(({"retrieval_weight": 1.0, "ot_weight": w_ot, "name_weight": w_name},
                     metrics(scores, gold, (1.0, w_ot, w_name))))
    grid.sort(key=lambda row: -row[1]["mrr"])
    print(f"recall@{scores.shape[1]} of the retrieval: {np.mean(gold >= 0):.4f}")
    for w, m in grid[:8]:
        print(json.dumps({**w, **{k: round(v, 4) for k, v in m.items()}}))
    best = grid[0][0]
    print(f"EL_RERANK__OT_WEIGHT={best['ot_weight']} EL_RERANK__NAME_WEIGHT={best['name_weight']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
