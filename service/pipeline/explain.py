"""Alignment pictures (`explain=true`): the transport plans the reranker scored with, as words and patches.

The cross scorers (service/pipeline/rerank.py) fill a `PlanRecorder` when the Linker hands them one, which it does
only for a batch with a query that asked for an explanation: the default path does no extra work. The recorder keeps
the very plans the solver returned (a reference per mention, no re-solve), the unit values computed from them, and the
masks; `explanations` then turns those of a result's top candidates into `Alignment`s: the mention's and the entity's
content tokens (the tokenizer's wordpieces; a piece that continues a word starts with "##") and the plan between them,
and for images the plan over the backbone's patch grid (row-major, 7x7 for EfficientNet-Lite0 at 224 px).

How the OT term follows from what is returned (the test in tests/pipeline/test_explain.py recomputes it):
- trained student (the default): rerank_score = (text_term + visual_term) / 6, each term OT-MEL's g2l of the unit
  with the plan normalised per row and per column (models/otmel.py cross_g2l); the visual term is solved against the
  blank image's patches where either side has no image (`image` is then null).
- zero-shot features: each unit's term is the transport-weighted cosine sum_ij P_ij cos(x_i, y_j) over the mention's
  tokens and the candidate's name tokens (and the two images' patches when both have one); rerank_score is the text
  term, or the mean of the two when both images are there.
Marginals are uniform over the tokens (patches) listed: each row of a plan sums to 1 / len(mention tokens), each
column to 1 / len(entity tokens), up to the solver's tolerance (EL_RERANK__TOL).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from kg_index.load import KGIndex
from models.runtime import EncoderRuntime
from service.pipeline.types import LinkQuery, LinkResult

logger = logging.getLogger(__name__)

EXPLAIN_TOP = 3  # candidates explained per mention: with <= 38 x 38 tokens and 49 x 49 patches, <= ~180 KB of JSON
DIGITS = 9  # decimals kept of plan entries (masses are >= about 1e-4 where they matter; rounding moves sums < 1e-6)


@dataclass
class UnitPlans:
    """One unit's solved plans for one mention's K candidate slots, as the cross scorer had them."""

    plan: np.ndarray  # [K, N, M] float32 (a slot with solved=False holds zeros)
    mention_mask: np.ndarray  # [N] bool: rows with mass
    entity_mask: np.ndarray  # [K, M] bool: columns with mass
    values: np.ndarray  # [K] the unit's term for each slot (see the module doc)
    solved: np.ndarray  # [K] bool: a plan was solved for the slot


@dataclass
class PlanRecorder:
    """Which mentions of a cross scorer call to record (positions in its batch), and what it recorded."""

    want: np.ndarray  # [B] bool
    text: dict[int, UnitPlans] = field(default_factory=dict)
    visual: dict[int, UnitPlans] = field(default_factory=dict)

    def wanted(self, positions: np.ndarray) -> list[tuple[int, int]]:
        """(index into positions, batch position) for each wanted position."""
        return [(i, int(p)) for i, p in enumerate(positions) if self.want[p]]

    def sub(self, keep: np.ndarray) -> PlanRecorder:
        """A recorder for a call over the mentions `keep` of this batch (adaptive rerank); see `merge`."""
        return PlanRecorder(self.want[keep])

    def merge(self, sub: PlanRecorder, keep: np.ndarray) -> None:
        for i, p in sub.text.items():
            self.text[int(keep[i])] = p
        for i, p in sub.visual.items():
            self.visual[int(keep[i])] = p


@dataclass
class TextAlignment:
    mention_tokens: list[str]  # content tokens of `mention [SEP] sentence` (wordpieces)
    mention_first: int  # how many of them are the mention's (the rest: the sentence's)
    entity_tokens: list[str]  # the entity's tokens the plan covers: `name [SEP] description` (zero-shot: the name)
    entity_first: int  # how many of them are the name's
    plan: list[list[float]]  # [len(mention_tokens)][len(entity_tokens)]


@dataclass
class ImageAlignment:
    grid: list[int]  # [rows, cols] of the patch grid; patches are numbered row-major
    plan: list[list[float]]  # [mention patches][entity patches]
    entity_has_image: bool


@dataclass
class Alignment:
    id: str
    name: str
    rerank_score: float | None  # the OT term the candidate carries (null when its solve was skipped)
    scorer: str  # "student" or "zero-shot": how the terms below make rerank_score (module doc)
    text_term: float | None
    visual_term: float | None
    text: TextAlignment | None
    image: ImageAlignment | None


def _round(plan: np.ndarray) -> list[list[float]]:
    return np.round(plan.astype(np.float64), DIGITS).tolist()


def _tokens(runtime: EncoderRuntime, first: str, second: str) -> tuple[list[str], list[int]]:
    """Token strings and type ids of `first [SEP] second`, position by position, as the encoders saw them."""
    enc = runtime.tokenizer.encode(first, second)
    return list(enc.tokens), list(enc.type_ids)


def _pick(tokens: list[str], types: list[int], mask: np.ndarray) -> tuple[list[str], int]:
    """The tokens at the positions of mask (a position past the tokenizer's output reads "?"), and how many of
    them belong to the first text."""
    pos = np.flatnonzero(mask)
    words = [tokens[p] if p < len(tokens) else "?" for p in pos]
    first = sum(1 for p in pos if p < len(types) and types[p] == 0)
    return words, first


def explanations(index: KGIndex, runtime: EncoderRuntime, scorer: str, queries: list[LinkQuery], rows: np.ndarray,
                 results: list[LinkResult], recorder: PlanRecorder) -> dict[int, list[Alignment]]:
    """Per query that asked for it (by position): the alignments of its top EXPLAIN_TOP entities."""
    out: dict[int, list[Alignment]] = {}
    for i, (q, res) in enumerate(zip(queries, results)):
        if not q.explain:
            continue
        m_tokens, m_types = _tokens(runtime, q.mention, q.context)
        text, vis = recorder.text.get(i), recorder.visual.get(i)
        aligned = []
        for cand in res.entities[:EXPLAIN_TOP]:
            row = index.row_of[cand.id]
            slot = int(np.flatnonzero(rows[i] == row)[0])
            meta = index.entities[row]
            t_al = v_al = None
            t_val = v_val = None
            if text is not None and text.solved[slot]:
                e_tokens, e_types = _tokens(runtime, meta.name, meta.description)
                qm, em = text.mention_mask, text.entity_mask[slot]
                mw, mf = _pick(m_tokens, m_types, qm)
                ew, ef = _pick(e_tokens, e_types, em)
                t_al = TextAlignment(mw, mf, ew, ef, _round(text.plan[slot][np.ix_(qm, em)]))
                t_val = float(text.values[slot])
            if vis is not None and vis.solved[slot]:
                v_val = float(vis.values[slot])
                if q.image is not None:
                    p = vis.plan.shape[-1]
                    side = math.isqrt(p)
                    grid = [side, side] if side * side == p else [1, p]
                    t_img = bool(index.image_rows[row] >= 0)
                    v_al = ImageAlignment(grid, _round(vis.plan[slot]), t_img)
            aligned.append(Alignment(cand.id, cand.name, cand.rerank_score, scorer, t_val, v_val, t_al, v_al))
        out[i] = aligned
    return out
