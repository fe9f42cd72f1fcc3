"""Fit the adaptive rerank's skip margin (EL_RERANK__SKIP_MARGIN) on dev splits.

One pass per split with OT solved for every mention and every reranked candidate returned: from the response's
terms follow, per mention, the score without OT (the final score minus the weighted OT term), its top-1 margin,
and whether the gold is first with and without OT. Skipping at margin t keeps the no-OT answer wherever the
margin exceeds t; the fit takes the smallest t whose H@1 loss against always solving stays within `max_loss` on
every split (the most skipping that costs at most that much anywhere).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kg_index.readers import read_mentions
from service.pipeline.linker import Linker, top_margin
from service.pipeline.types import LinkQuery

logger = logging.getLogger(__name__)


@dataclass
class SplitMargins:
    """Per mention of one split: the no-OT margin and whether the gold is first with OT and without it."""

    name: str
    margin: np.ndarray  # [N] float
    right_with_ot: np.ndarray  # [N] bool
    right_without: np.ndarray  # [N] bool

    def h1(self, t: float) -> float:
        """H@1 when mentions with margin > t skip OT."""
        skip = self.margin > t
        return float(np.where(skip, self.right_without, self.right_with_ot).mean()) if len(skip) else 0.0

    def skipped(self, t: float) -> float:
        return float((self.margin > t).mean()) if len(self.margin) else 0.0


def split_margins(linker: Linker, data_dir: Path, dataset: str, split: str, *, limit: int | None = None,
                  batch: int = 64) -> SplitMargins:
    from kg_index.build import load_entity_image

    mentions = read_mentions(data_dir, dataset, split)[:limit]
    lk = linker.with_skip_margin(None)
    k = lk.settings.rerank.candidates
    w = lk.rerank.ot_weight
    margin, with_ot, without = [], [], []
    for i in tqdm(range(0, len(mentions), batch), desc=f"{dataset} {split}", unit="batch"):
        chunk = mentions[i : i + batch]
        out = lk.link_batch([LinkQuery(m.mention, m.context, load_entity_image(m.image), top_k=k) for m in chunk])
        for m, r in zip(chunk, out.results):
            ids = [c.id for c in r.entities]
            no_ot = np.array([[c.score - w * (c.rerank_score or 0.0) for c in r.entities]], np.float64)
            margin.append(float(top_margin(no_ot, np.zeros(no_ot.shape, int))[0]) if ids else np.inf)
            with_ot.append(bool(ids) and ids[0] == m.answer)
            without.append(bool(ids) and ids[int(np.argmax(no_ot[0]))] == m.answer)
    return SplitMargins(f"{dataset} {split}", np.array(margin), np.array(with_ot), np.array(without))


def fit(splits: list[SplitMargins], max_loss: float = 0.001) -> dict:
    """The smallest margin whose H@1 loss (a fraction) is at most max_loss on every split, with a table of the
    trade-off at a few margins."""
    # -inf first: where OT changes no top-1 anywhere, skipping it everywhere is the fit
    cuts = [-np.inf, *np.unique(np.concatenate([s.margin[np.isfinite(s.margin)] for s in splits] or [np.zeros(0)]))]
    best = None
    for t in cuts:  # ascending: the first that holds skips the most
        if all(s.h1(float("inf")) - s.h1(float(t)) <= max_loss + 1e-12 for s in splits):
            best = float(t)
            break

    def row(t: float | None) -> dict:
        tt = float("inf") if t is None else t
        return {"margin": t, **{s.name: {"h@1": round(s.h1(tt), 4), "skipped": round(s.skipped(tt), 4),
                                         "h1_points_vs_always": round(100 * (s.h1(tt) - s.h1(float("inf"))), 2)}
                                for s in splits}}

    table = [row(t) for t in (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)] + [row(None)]
    return {"max_loss_points": 100 * max_loss, "skip_margin": best, "at_fit": row(best) if best is not None else None,
            "table": table}
