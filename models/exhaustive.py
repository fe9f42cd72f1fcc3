"""The paper's protocol for a cross-scoring model: score every KB entity for every mention, exactly.

OT-MEL's overall score is  separable(m, e) + (g2l_text(m, e) + g2l_visual(m, e)) / 6  (models/otmel.py),
where the separable part is one matrix product and each cross term is a mean of two cosines, so
|g2l_text| <= 1. Solving the text cross term (an OT problem over 40 x 40 tokens) for all 40,942 entities of
every mention would take hours on a CPU; the gold entity's rank does not need it:
  entities with  separable + (visual - 1) / 6 >  score(gold)   outrank the gold whatever their cross term;
  entities with  separable + (visual + 1) / 6 <= score(gold)   cannot outrank it;
only the rest (usually a few dozen) are solved. The visual cross term is exact for every entity: all
entities without an image share one blank image, so it is one value per mention plus the few real images.
The ranks are therefore exactly those of scoring every entity (a test checks this against brute force).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from models.feature_cache import CachedItems
from models.otmel import ItemEncoding, OTMELModel
from models.train import item_tensors

logger = logging.getLogger(__name__)

SLACK = 1e-5  # float error allowance on the |g2l| <= 1 bound


@dataclass
class KBEncoding:
    enc: ItemEncoding  # every KB entity (text locals kept in memory: N x T x d fp32)
    vectors: torch.Tensor  # [N, 4d] retrieval vectors
    image_rows: np.ndarray  # KB rows that have their own image
    blank_row: int  # a KB row without an image (-1 when every entity has one)


@torch.no_grad()
def encode_kb(model: OTMELModel, kb: CachedItems, batch: int = 1024, progress: bool = True) -> KBEncoding:
    parts = []
    for s in tqdm(range(0, len(kb), batch), desc="encoding KB (teacher)", unit="batch", disable=not progress):
        parts.append(model.encode_entities(*item_tensors(kb, np.arange(s, min(s + batch, len(kb))))))
    enc = ItemEncoding(*(torch.cat([getattr(p, f) for p in parts]) for f in ItemEncoding.__dataclass_fields__))
    has = kb.image_rows >= 0
    no_image = np.flatnonzero(~has)
    return KBEncoding(enc, enc.retrieval_vector(), np.flatnonzero(has), int(no_image[0]) if len(no_image) else -1)


@dataclass
class ExhaustiveStats:
    pairs_total: int = 0
    pairs_solved: int = 0  # text cross terms actually computed (gold + ambiguous entities)


@torch.no_grad()
def exhaustive_ranks(model: OTMELModel, kb: KBEncoding, mentions: CachedItems, gold: np.ndarray, *,
                     batch: int = 32, progress: bool = True) -> tuple[list[int], ExhaustiveStats]:
    """1-based rank of each mention's gold KB row under the model's overall score against every KB entity."""
    model.eval()
    stats = ExhaustiveStats()
    n_kb = kb.vectors.shape[0]
    ranks: list[int] = []
    for s in tqdm(range(0, len(mentions), batch), desc="teacher, every KB entity", unit="batch", disable=not progress):
        idx = np.arange(s, min(s + batch, len(mentions)))
        m = model.encode_mentions(*item_tensors(mentions, idx))
        sep = m.retrieval_vector() @ kb.vectors.T  # [b, N]
        visual = _visual_all(model, m, kb)  # [b, N] exact
        for i, j in enumerate(idx):
            g = int(gold[j])
            mi = m.select(torch.tensor([i]))
            gold_text = model.g2l_text(mi, kb.enc.select(torch.tensor([g])), pairwise=False)[0]
            g_score = float(sep[i, g] + (gold_text[0] + visual[i, g]) / 6)
            lower = sep[i] + (visual[i] - 1 - SLACK) / 6
            upper = sep[i] + (visual[i] + 1 + SLACK) / 6
            sure = int((lower > g_score).sum())
            amb = torch.nonzero((lower <= g_score) & (upper > g_score)).flatten()
            amb = amb[amb != g]
            above = 0
            for c in range(0, len(amb), 4096):
                rows = amb[c : c + 4096]
                mm = m.select(torch.full((len(rows),), i))
                text = model.g2l_text(mm, kb.enc.select(rows), pairwise=False)[0]
                above += int(((sep[i, rows] + (text + visual[i, rows]) / 6) > g_score).sum())
            ranks.append(1 + sure + above)
            stats.pairs_total += n_kb
            stats.pairs_solved += 1 + len(amb)
    return ranks, stats


@dataclass
class Top1Stats:
    pairs_total: int = 0
    pairs_solved: int = 0  # text cross terms computed to prove each mention's top entity


@torch.no_grad()
def bounded_top1(model: OTMELModel, kb: KBEncoding, mentions: CachedItems, *, batch: int = 32, first: int = 16,
                 chunk: int = 1024) -> tuple[list[int], Top1Stats]:
    """Each mention's top KB row under the teacher's overall score, exactly, without its label: what a served
    teacher could do instead of scoring every entity. Entities are solved in order of their upper bound (text
    cross term at +1) until the best exact score so far is at least the next entity's upper bound; an entity
    whose upper bound is below the best lower bound is never touched. Chunks start at `first` entities and
    double up to `chunk`."""
    model.eval()
    stats = Top1Stats()
    tops: list[int] = []
    for s in range(0, len(mentions), batch):
        idx = np.arange(s, min(s + batch, len(mentions)))
        m = model.encode_mentions(*item_tensors(mentions, idx))
        sep = m.retrieval_vector() @ kb.vectors.T
        visual = _visual_all(model, m, kb)
        for i in range(len(idx)):
            lower = sep[i] + (visual[i] - 1 - SLACK) / 6
            upper = sep[i] + (visual[i] + 1 + SLACK) / 6
            live = torch.nonzero(upper >= lower.max()).flatten()
            live = live[torch.argsort(upper[live], descending=True)]
            best, best_row, c, size = -float("inf"), -1, 0, first
            while c < len(live) and float(upper[live[c]]) > best:
                rows = live[c : c + size]  # chunks grow: most tops are proven by the first few entities
                c, size = c + len(rows), min(2 * size, chunk)
                mm = m.select(torch.full((len(rows),), i))
                text = model.g2l_text(mm, kb.enc.select(rows), pairwise=False)[0]
                score = sep[i, rows] + (text + visual[i, rows]) / 6
                j = int(torch.argmax(score))
                stats.pairs_solved += len(rows)
                if float(score[j]) > best:
                    best, best_row = float(score[j]), int(rows[j])
            tops.append(best_row)
            stats.pairs_total += kb.vectors.shape[0]
    return tops, stats


@torch.no_grad()
def full_scores(model: OTMELModel, kb: KBEncoding, mentions: CachedItems, idx: np.ndarray, *,
                chunk: int = 1024) -> torch.Tensor:
    """The overall score of each of the mentions `idx` against every KB entity [len(idx), N], every text cross
    term solved: the paper's protocol as it is, for timing it on a few mentions (about 2 s of CPU per mention
    against 40,942 entities) and for checking the shortcuts above."""
    model.eval()
    n_kb = kb.vectors.shape[0]
    out = torch.empty(len(idx), n_kb)
    for r, j in enumerate(idx):
        m = model.encode_mentions(*item_tensors(mentions, np.asarray([j])))
        sep = (m.retrieval_vector() @ kb.vectors.T)[0]
        visual = _visual_all(model, m, kb)[0]
        for c in range(0, n_kb, chunk):
            rows = torch.arange(c, min(c + chunk, n_kb))
            mm = m.select(torch.zeros(len(rows), dtype=torch.long))
            text = model.g2l_text(mm, kb.enc.select(rows), pairwise=False)[0]
            out[r, c : c + len(rows)] = sep[rows] + (text + visual[rows]) / 6
    return out


def _visual_all(model: OTMELModel, m: ItemEncoding, kb: KBEncoding) -> torch.Tensor:
    """The visual cross term of each mention with every KB entity [b, N]: one blank column plus real images."""
    b = m.g_text.shape[0]
    cols = ([kb.blank_row] if kb.blank_row >= 0 else []) + kb.image_rows.tolist()
    sub = model.g2l_visual(m, kb.enc.select(torch.tensor(cols, dtype=torch.long)))  # [b, len(cols)]
    out = torch.empty(b, kb.vectors.shape[0])
    if kb.blank_row >= 0:
        out[:] = sub[:, :1]
    if len(kb.image_rows):
        out[:, torch.from_numpy(kb.image_rows)] = sub[:, -len(kb.image_rows):]
    return out


@torch.no_grad()
def brute_force_ranks(model: OTMELModel, kb: KBEncoding, mentions: CachedItems, gold: np.ndarray) -> list[int]:
    """Score every (mention, entity) pair outright; for tests on small KBs."""
    m = model.encode_mentions(*item_tensors(mentions, np.arange(len(mentions))))
    overall = model.scores(m, kb.enc).overall  # [M, N]
    g = overall[torch.arange(len(gold)), torch.from_numpy(gold)]
    return (1 + (overall > g[:, None]).sum(1)).tolist()
