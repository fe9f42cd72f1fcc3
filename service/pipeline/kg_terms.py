"""KG-consistency terms of the rerank score (the "kg" source of service/pipeline/terms.py): what the KG's own
facts say about a candidate for a mention.

Most mentions the encoders get wrong are surnames in photo captions ("Wilson with Lieutenant General Sir
Oliver Leese, Italy, 30 April 1944"), where several same-named people are equally plausible to the
encoders. The KG still rules some of them out, and these terms let the reranker use it:

- `name_tokens_score` (1/0): every token of the mention is a token of the candidate's name ("Crist" names
  "Charlie Crist", only resembles "Cristiano Ronaldo").
- `before_birth_score` (1/0): the sentence is dated (1944, c.1865, the 1900s, 1802-1878) and every date ends before
  the candidate's birth (or founding) year (Janina Uhse, born 1989, is not in a 1954 photo).
- `after_death_score` (1/0): every date starts after the year following the candidate's death (a Henry Wilson who
  died in 1875 is not in a 1944 photo). A weaker cue than the first: stamps, statues and portraits of
  the dead are dated after their death.
  Both are 0 when either side has no date.
- `description_overlap_score` in [0, 1): the IDF mass of the sentence's other words found in the candidate's
  description ("Bolton", "Eton College"), as 1 - exp(-mass / 10).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter

import numpy as np
from rapidfuzz import utils

from kg_index.load import EntityMeta
from service.pipeline.terms import fields_of

logger = logging.getLogger(__name__)

# A year of 1000-2099, not part of a longer number or a negative one; "1900s" is the decade; "1802-1878"
# (hyphen or en dash) the span.
_YEAR = re.compile(r"(?<![\d-])(1\d{3}|20\d{2})(?:(s)|\s*[-\u2013]\s*(1\d{3}|20\d{2}))?(?!\d)")
_OVERLAP_SCALE = 10.0  # nats of IDF for which the overlap reaches 1 - 1/e


def tokens(text: str) -> set[str]:
    return set(utils.default_process(text).split())


def dated_spans(text: str) -> list[tuple[int, int]]:
    """The years a sentence mentions, as (first, last) spans: '1944' -> (1944, 1944), '1900s' -> (1900, 1909),
    '1802-1878' -> (1802, 1878)."""
    spans = []
    for first, decade, last in _YEAR.findall(text):
        lo = int(first)
        spans.append((lo, lo + 9) if decade else (lo, max(lo, int(last))) if last else (lo, lo))
    return spans


def before_birth(spans: list[tuple[int, int]], start: int | None) -> bool:
    """True when the sentence is dated and every date ends before `start`."""
    return bool(spans) and start is not None and all(hi < start for _, hi in spans)


def after_death(spans: list[tuple[int, int]], end: int | None) -> bool:
    """True when the sentence is dated and every date starts after `end + 1` (a year's grace)."""
    return bool(spans) and end is not None and all(lo > end + 1 for lo, _ in spans)


class KGTerms:
    """The terms for one index; its description-word IDF is counted once, when the index is swapped in."""

    def __init__(self, entities: list[EntityMeta]) -> None:
        self.entities = entities
        df: Counter[str] = Counter()
        for e in entities:
            df.update(tokens(e.description))
        n = len(entities)
        self.idf = {t: math.log((n + 1) / (c + 1)) for t, c in df.items()}  # >= 0: a word in every description is 0
        logger.info("KG terms: %d description words over %d entities", len(self.idf), len(entities))

    def score(self, mentions: list[str], contexts: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Each term for every candidate row [B, K] (zeros where rows < 0), by its response field."""
        out = {f: np.zeros(rows.shape, np.float32) for f in fields_of("kg")}
        for i, (mention, context) in enumerate(zip(mentions, contexts)):
            said = tokens(mention)
            words = tokens(context) - said
            spans = dated_spans(context)
            for j, row in enumerate(rows[i]):
                if row < 0:
                    continue
                e = self.entities[row]
                out["name_tokens_score"][i, j] = float(bool(said) and said <= tokens(e.name))
                out["before_birth_score"][i, j] = float(before_birth(spans, e.start_year))
                out["after_death_score"][i, j] = float(after_death(spans, e.end_year))
                mass = sum(self.idf.get(w, 0.0) for w in words & tokens(e.description))
                out["description_overlap_score"][i, j] = 1.0 - math.exp(-mass / _OVERLAP_SCALE)
        return out
