"""String terms of the rerank score: how the mention and its sentence spell the candidate's name (rapidfuzz).
Their fields and weights: service/pipeline/terms.py."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from rapidfuzz import fuzz, utils

logger = logging.getLogger(__name__)


def _per_candidate(texts: list[str], names: list[list[str]], scorer: Callable[[str, str], float]) -> np.ndarray:
    """scorer(text, name) / 100 on normalised strings for every candidate name of every text [B, max names]."""
    width = max((len(n) for n in names), default=0)
    out = np.zeros((len(texts), width), np.float32)
    for i, (t, row) in enumerate(zip(texts, names)):
        text = utils.default_process(t)
        for j, n in enumerate(row):
            out[i, j] = scorer(text, utils.default_process(n)) / 100.0
    return out


def name_similarity(mentions: list[str], names: list[list[str]]) -> np.ndarray:
    """Surface-form similarity in [0, 1] (rapidfuzz WRatio) of each mention and its candidates' names."""
    return _per_candidate(mentions, names, fuzz.WRatio)


def context_name_similarity(texts: list[str], names: list[list[str]]) -> np.ndarray:
    """How completely each candidate's name is spelled out in the mention and its sentence, in [0, 1]
    (rapidfuzz token_set_ratio: 1 when one token set holds the other, mostly every name token in the text).

    Why: a mention is often a fragment ("Luxembourg", "Rice") of a sentence that names the entity in full
    ("Susan Elizabeth Rice is an American diplomat"); the surface-form score alone cannot see that."""
    return _per_candidate(texts, names, fuzz.token_set_ratio)


def string_terms(mentions: list[str], contexts: list[str], names: list[list[str]],
                 shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The "strings" terms [B, K] (zeros after each row's last candidate) for the candidates' names of each
    mention: names[i] lists row i's candidates in order, without the missing ones (they come last)."""
    return {
        "name_score": _pad(name_similarity(mentions, names), shape),
        "context_name_score": _pad(
            context_name_similarity([f"{m} {c}" for m, c in zip(mentions, contexts)], names), shape),
    }


def _pad(scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Per-candidate scores [B, <= K] (rows cut at their last candidate) -> [B, K], zeros after."""
    out = np.zeros(shape, np.float32)
    out[:, : scores.shape[1]] = scores
    return out
