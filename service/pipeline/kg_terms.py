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

import itertools
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
    """The terms for one index. Everything about the entities is read once, when the index is swapped in: the
    description words' IDF, each name's and description's distinct words (ids in flat arrays), the lifespans as
    arrays. Scoring a batch is then a few array operations over its (candidate, word) pairs instead of
    re-tokenising every candidate's name and description."""

    def __init__(self, entities: list[EntityMeta], *, idf_from: KGTerms | None = None) -> None:
        """`idf_from`: take the description words' IDF from another KGTerms (a live index's appended rows use the
        base's; a word the base never saw gets the IDF of one in 1 description of the base's size)."""
        self.entities = entities
        desc = [tokens(e.description) for e in entities]
        df: Counter[str] = Counter()
        for words in desc:
            df.update(words)
        n = len(entities)
        if idf_from is None:
            self.idf = {t: math.log((n + 1) / (c + 1)) for t, c in df.items()}  # >= 0: a word in every description is 0
        else:
            rare = math.log((len(idf_from.entities) + 1) / 2)
            self.idf = {t: idf_from.idf.get(t, rare) for t in df}
        self._vocab = {t: i for i, t in enumerate(self.idf)}
        self._idf = np.fromiter(self.idf.values(), np.float64, len(self.idf))
        self._desc_ids, self._desc_ptr = _flat_ids(desc, self._vocab)
        names = [tokens(e.name) for e in entities]
        self._name_vocab: dict[str, int] = {}
        for name in names:
            for t in name:
                self._name_vocab.setdefault(t, len(self._name_vocab))
        self._name_ids, self._name_ptr = _flat_ids(names, self._name_vocab)
        nan = float("nan")
        self._start = np.array([nan if e.start_year is None else e.start_year for e in entities], np.float64)
        self._end = np.array([nan if e.end_year is None else e.end_year for e in entities], np.float64)
        (logger.debug if idf_from is not None else logger.info)(
            "KG terms: %d description words over %d entities", len(self.idf), len(entities))

    def score(self, mentions: list[str], contexts: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Each term for every candidate row [B, K] (zeros where rows < 0), by its response field."""
        out = {f: np.zeros(rows.shape, np.float32) for f in fields_of("kg")}
        real = rows >= 0
        if not real.any():
            return out
        safe = np.where(real, rows, 0)
        pair = np.flatnonzero(real.reshape(-1))  # the real candidates, flat; mention of each: pair // K
        cand, mention_of = rows.reshape(-1)[pair], pair // rows.shape[1]
        said = [tokens(m) for m in mentions]

        # Name tokens: how many of the mention's tokens the name has; 1 when all (and the mention has some).
        found = self._matches(said, self._name_vocab, self._name_ids, self._name_ptr, cand, mention_of, None)
        need = np.array([len(t) for t in said])[mention_of]
        out["name_tokens_score"].reshape(-1)[pair] = (need > 0) & (found == need)

        # Dates, all candidates at once: the latest year any date reaches and the earliest it starts, per sentence
        # (NaN when undated, and NaN years of undated entities: every comparison with NaN is False, i.e. 0).
        spans = [dated_spans(c) for c in contexts]
        last = np.array([max((hi for _, hi in sp), default=np.nan) for sp in spans], np.float64)[:, None]
        first = np.array([min((lo for lo, _ in sp), default=np.nan) for sp in spans], np.float64)[:, None]
        out["before_birth_score"][:] = real & (last < self._start[safe])
        out["after_death_score"][:] = real & (first > self._end[safe] + 1)

        # Description overlap: the IDF mass of the sentence's other words found in each candidate's description.
        words = [tokens(c) - m for m, c in zip(said, contexts)]
        mass = self._matches(words, self._vocab, self._desc_ids, self._desc_ptr, cand, mention_of, self._idf)
        out["description_overlap_score"].reshape(-1)[pair] = 1.0 - np.exp(-mass / _OVERLAP_SCALE)
        return out

    @staticmethod
    def _matches(texts: list[set[str]], vocab: dict[str, int], ids: np.ndarray, ptr: np.ndarray, cand: np.ndarray,
                 mention_of: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        """For each (mention, candidate) pair: how many (weight None) or what weight of the candidate's words
        (ids[ptr[c]:ptr[c + 1]]) are among its mention's words texts[mention], over the flat (pair, word) list."""
        v = len(vocab)
        keys = np.array(sorted({i * v + vocab[w] for i, text in enumerate(texts) for w in text if w in vocab}),
                        np.int64)
        if not len(keys):
            return np.zeros(len(cand))
        starts, lengths = ptr[cand], ptr[cand + 1] - ptr[cand]
        owner = np.repeat(np.arange(len(cand)), lengths)  # which pair each candidate word belongs to
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        word = ids[starts[owner] + within]
        query = mention_of[owner] * v + word
        hit = keys[np.minimum(np.searchsorted(keys, query), len(keys) - 1)] == query
        return np.bincount(owner, weights=hit if weight is None else np.where(hit, weight[word], 0.0),
                           minlength=len(cand))


def _flat_ids(texts: list[set[str]], vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Each text's distinct words as vocab ids, concatenated, and the offsets of each text's ids [N + 1]."""
    per_text = [[vocab[w] for w in text if w in vocab] for text in texts]
    ptr = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(i) for i in per_text], out=ptr[1:])
    return np.fromiter(itertools.chain.from_iterable(per_text), np.int32, int(ptr[-1])), ptr


class LayeredKGTerms:
    """The KG terms of a live index snapshot (kg_index/live.py): the base's rows scored by the base's KGTerms (built
    once per base), the appended rows [n_base, ...) by small KGTerms over runs of them, with the base's IDF. Runs
    are kept like a binary counter (a new run merges with the one before while that one is no larger), so each
    change re-reads O(log n) appended entities' words on average and a snapshot holds O(log n) runs; a run without
    candidates in a batch costs nothing. Dead rows are never candidates, so what they would score does not matter."""

    def __init__(self, base: KGTerms, runs: list[tuple[int, KGTerms]]) -> None:
        self.base = base
        self.n_base = len(base.entities)
        self.runs = runs  # (first row, terms over rows first .. first + len - 1)

    @classmethod
    def extended(cls, base: KGTerms, previous: LayeredKGTerms | None, appended: list[EntityMeta]) -> LayeredKGTerms:
        """The terms of a snapshot whose appended rows are `appended` (all of them, in row order), reusing the runs
        of `previous` (the same base's previous snapshot, whose appended rows are a prefix of these)."""
        n_base = len(base.entities)
        runs = list(previous.runs) if previous is not None and previous.base is base else []
        covered = runs[-1][0] + len(runs[-1][1].entities) - n_base if runs else 0
        if len(appended) > covered:
            runs.append((n_base + covered, KGTerms(appended[covered:], idf_from=base)))
            while len(runs) >= 2 and len(runs[-2][1].entities) <= len(runs[-1][1].entities):
                (first, a), (_, b) = runs[-2], runs[-1]
                runs[-2:] = [(first, KGTerms(a.entities + b.entities, idf_from=base))]
        return cls(base, runs)

    def score(self, mentions: list[str], contexts: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        in_base = rows < self.n_base
        if in_base.all() or not self.runs:
            return self.base.score(mentions, contexts, rows)
        out = self.base.score(mentions, contexts, np.where(in_base, rows, -1))
        for first, terms in self.runs:
            inside = (rows >= first) & (rows < first + len(terms.entities))
            if inside.any():
                part = terms.score(mentions, contexts, np.where(inside, rows - first, -1))
                out = {f: out[f] + part[f] for f in out}
        return out
