"""Choose the rerank score weights on dev splits: one pass through the served pipeline per split collects the
retrieval, OT, surface-form and name-in-context scores of every reranked candidate, then a grid search picks
the weights with the best MRR, averaged over the splits. Prints the grid's best rows and the settings to use.

    .venv/bin/python scripts/tune_weights.py --split dev wikimel richpedia wikidiverse

The retrieval weight stays 1.0 (only ratios matter); `--ot-weight 1.0` fixes the OT weight too, so that
retrieval + OT stays OT-MEL's overall score and only the name terms are tuned.
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

TERMS = ("retrieval_weight", "ot_weight", "name_weight", "context_name_weight")
OT_GRID = [0.5, 0.75, 1.0, 1.25, 1.5]
NAME_GRID = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
CONTEXT_GRID = [0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2]


def collect(linker: Linker, dataset: str, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """scores [M, K, 4] (one column per TERMS; NaN where no candidate) and gold [M] (candidate index or -1)."""
    s = linker.settings
    k = s.rerank.candidates
    mentions = read_mentions(s.data_dir, dataset, split)[:limit]
    scores = np.full((len(mentions), k, len(TERMS)), np.nan, np.float32)
    gold = np.full(len(mentions), -1)
    for i in tqdm(range(0, len(mentions), 64), desc=f"{dataset} {split}", unit="batch"):
        chunk = mentions[i : i + 64]
        out = linker.link_batch([LinkQuery(m.mention, m.context, load_entity_image(m.image), top_k=k) for m in chunk])
        for j, (m, r) in enumerate(zip(chunk, out.results)):
            for c, cand in enumerate(r.entities):
                scores[i + j, c] = (cand.retrieval_score, cand.rerank_score or 0.0, cand.name_score or 0.0,
                                    cand.context_name_score or 0.0)
                if cand.id == m.answer:
                    gold[i + j] = c
    return scores, gold


def metrics(scores: np.ndarray, gold: np.ndarray, w: tuple[float, ...]) -> dict[str, float]:
    final = np.nan_to_num(scores @ np.asarray(w, np.float32), nan=-np.inf)
    idx = np.arange(len(gold))
    g = final[idx, np.maximum(gold, 0)]
    # Ties go to the earlier candidate (retrieval order), as the served stable sort does.
    earlier = np.arange(final.shape[1])[None, :] < gold[:, None]
    ahead = (final > g[:, None]) | ((final == g[:, None]) & earlier)
    rank = np.where(gold >= 0, 1 + ahead.sum(1), 0)
    rr = np.where(rank > 0, 1.0 / np.maximum(rank, 1), 0.0)
    return {"h@1": float(np.mean(rank == 1)), "mrr": float(rr.mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="*", default=["wikimel"])
    ap.add_argument("--split", default="dev")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--ot-weight", type=float, default=None, help="fix the OT weight instead of searching it")
    args = ap.parse_args()
    linker = Linker.from_settings(Settings())
    data = {ds: collect(linker, ds, args.split, args.limit) for ds in args.datasets}
    for ds, (scores, gold) in data.items():
        print(f"{ds}: recall@{scores.shape[1]} of the retrieval {np.mean(gold >= 0):.4f}")
    ots = [args.ot_weight] if args.ot_weight is not None else OT_GRID
    grid = []
    for w in itertools.product([1.0], ots, NAME_GRID, CONTEXT_GRID):
        per = {ds: metrics(s, g, w) for ds, (s, g) in data.items()}
        grid.append((w, per, float(np.mean([m["mrr"] for m in per.values()]))))
    grid.sort(key=lambda row: -row[2])
    for w, per, mean in grid[:8]:
        print(json.dumps({**dict(zip(TERMS, w)), "mean_mrr": round(mean, 4),
                          **{ds: {k: round(v, 4) for k, v in m.items()} for ds, m in per.items()}}))
    best = dict(zip(TERMS, grid[0][0]))
    print(" ".join(f"EL_RERANK__{k.upper()}={v}" for k, v in best.items() if k != "retrieval_weight"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
