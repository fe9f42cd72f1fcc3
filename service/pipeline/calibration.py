"""How sure the linker is: the calibrated `confidence` and the `nil` verdict of each link.

Both come from features of a mention's reranked candidates in served order (`features`: the top final score, its
margin over the second, the top candidate's retrieval, OT, name and KG terms, how many candidates carry the
mention's tokens, ...), through two logistic models fitted offline on the dev splits (`el fit-calibration`,
service/offline/calibration.py) and shipped as JSON beside the heads (models/weights/calibration.json):

- `confidence`: P(the top entity is the gold), fitted on the dev splits' mentions against the whole KB;
- `answerable`: P(the mention's entity is in the KB at all), fitted on the same mentions under the NIL protocol
  (service/offline/nil_protocol.py: 20 % of their gold entities masked out of the KB, under several draws), over
  the score features, the mention's shape and what the KG says of the top candidate; `nil` is answerable < the
  fitted threshold (chosen on dev: best NIL F1 losing at most 1 H@1 point on any dev split).

Pure numpy; the respond stage calls `Calibration.assess` once per batch.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kg_index.attributes import lifespan
from service.pipeline.mention_prior import PRIOR_FEATURES, MentionPrior
from service.pipeline.terms import TERMS

if TYPE_CHECKING:
    from kg_index.load import EntityMeta

logger = logging.getLogger(__name__)

SCORE_FIELDS = ("score", "retrieval_score", *(t.field for t in TERMS))  # columns of a candidate score table
_F = {f: i for i, f in enumerate(SCORE_FIELDS)}
_PAD = -10.0  # score of a missing candidate (scores are about -1..1)

SCORE_FEATURES = ("top", "margin", "log_margin", "gap5", "retrieval", "ot", "name", "context_name", "name_tokens",
                  "description", "p20", "p50", "name_second", "one_token", "name_multi", "context_name_multi",
                  "name_exact", "retrieval_max", "n_name_tokens", "n_name_close", "top_minus_best_tokens",
                  "log_n_name_tokens")
# The mention's own shape. A lower-case mention ("parliament", "satellites") or one with digits ("200 m") names a
# concept or an event more often than a person, and the KG's namesakes of such mentions differ in kind: with these
# the answerable model separates WikiDiverse-like mentions from WikiMEL-like ones under one threshold.
SHAPE_FEATURES = ("mention_lower", "mention_digit", "mention_chars", "mention_title", "mention_words",
                  "mention_upper")
# What the KG says of the top candidate (`entity_facts`): whether it has a description, how long (capped), and
# whether it is dated (a birth or start year: the KG-consistency terms can only check a dated candidate). A bare or
# undated entry gets few of the rerank's KG terms, so the same scores mean less; namesakes left in the KG are
# often such entries.
ENTITY_FEATURES = ("top_described", "top_description_len", "top_dated")
# What annotated training mentions say of the mention's surface form (service/pipeline/mention_prior.py), read from
# the same `facts` array after the entity's columns (zeros where there is no prior).
FACT_FEATURES = ENTITY_FEATURES + PRIOR_FEATURES
FEATURES = SCORE_FEATURES + SHAPE_FEATURES + FACT_FEATURES  # new ones go last: a shipped model names what it reads
DESCRIPTION_CAP = 500  # characters (99 % of the MEL KB's descriptions are shorter than 280)


def entity_facts(entities: Sequence[EntityMeta | None]) -> np.ndarray:
    """[B, len(ENTITY_FEATURES)] for each mention's top candidate (None: no candidate, all 0)."""
    rows = []
    for e in entities:
        if e is None:
            rows.append((0.0, 0.0, 0.0))
            continue
        start, end = lifespan(e.start_year, e.end_year, e.description)
        rows.append((float(bool(e.description)), min(len(e.description or ""), DESCRIPTION_CAP) / 100,
                     float(start is not None or end is not None)))
    return np.array(rows, np.float64).reshape(len(rows), len(ENTITY_FEATURES))


def mention_facts(mentions: list[str], tops: Sequence[EntityMeta | None], prior: MentionPrior | None,
                  present: Callable[[str], bool], version: str, kb_size: int) -> np.ndarray:
    """[B, len(FACT_FEATURES)]: `entity_facts` of the top candidates, then the prior's features (zeros without a
    prior, or where it does not apply to this KB). `present`: whether an entity id is in the KB now; `version` and
    `kb_size`: the index's."""
    facts = entity_facts(tops)
    if prior is None or not prior.applies(version, present, kb_size):
        return np.concatenate([facts, np.zeros((len(mentions), len(PRIOR_FEATURES)))], 1)
    return np.concatenate([facts, prior.features(mentions, [e.id if e else None for e in tops], present)], 1)


def features(mentions: list[str], cands: np.ndarray, facts: np.ndarray) -> np.ndarray:
    """[B, len(FEATURES)] from the mentions, their candidates' scores [B, K, len(SCORE_FIELDS)] in served order
    (final score descending; NaN rows where a mention has fewer than K) and their `mention_facts` [B,
    len(FACT_FEATURES)] (or `entity_facts` alone). Serving and fitting both call this."""
    b = cands.shape[0]
    if cands.shape[1] < 2:  # margins need a second candidate: pad one
        cands = np.concatenate([cands, np.full((b, 2 - cands.shape[1], cands.shape[2]), np.nan, cands.dtype)], 1)
    s = np.nan_to_num(cands[:, :, _F["score"]].astype(np.float64), nan=_PAD)
    filled = np.nan_to_num(cands.astype(np.float64), nan=0.0)  # one pass (per column it was a third of a request's
    col = {f: filled[:, :, i] for f, i in _F.items()}          # respond stage at batch 1)
    top = s[:, 0]
    margin = top - s[:, 1]
    one = np.array([len(m.split()) <= 1 for m in mentions], np.float64)
    name = col["name_score"][:, 0]
    tokens = col["name_tokens_score"]
    n_tokens = tokens.sum(1)
    with np.errstate(over="ignore"):
        out = {
            "top": top, "margin": margin, "log_margin": np.log(np.maximum(margin, 1e-4)),
            "gap5": top - s[:, 1:5].mean(1),
            "retrieval": col["retrieval_score"][:, 0], "ot": col["rerank_score"][:, 0], "name": name,
            "context_name": col["context_name_score"][:, 0], "name_tokens": tokens[:, 0],
            "description": col["description_overlap_score"][:, 0],
            "p20": 1 / np.exp(20 * (s - top[:, None])).sum(1), "p50": 1 / np.exp(50 * (s - top[:, None])).sum(1),
            "name_second": col["name_score"][:, 1], "one_token": one, "name_multi": name * (1 - one),
            "context_name_multi": col["context_name_score"][:, 0] * (1 - one), "name_exact": (name >= 0.999) * 1.0,
            "retrieval_max": np.where(np.isnan(cands[:, :, _F["retrieval_score"]]), -1.0,
                                      col["retrieval_score"]).max(1),
            "n_name_tokens": n_tokens, "n_name_close": (col["name_score"] >= 0.85).sum(1) * 1.0,
            "top_minus_best_tokens": top - np.where(tokens > 0, s, _PAD).max(1),
            "log_n_name_tokens": np.log1p(n_tokens),
        }
    out.update(_shape(mentions))
    if facts.shape[1] < len(FACT_FEATURES):  # entity facts alone: no prior
        facts = np.concatenate([facts, np.zeros((b, len(FACT_FEATURES) - facts.shape[1]))], 1)
    out.update({f: facts[:, i] for i, f in enumerate(FACT_FEATURES)})
    return np.stack([out[f] for f in FEATURES], 1)


def _shape(mentions: list[str]) -> dict[str, np.ndarray]:
    rows = [(m[:1].islower(), any(c.isdigit() for c in m), len(m) / 10, all(w[:1].isupper() for w in m.split()),
             len(m.split()), m.isupper()) for m in mentions]
    cols = np.array(rows, np.float64).reshape(len(mentions), len(SHAPE_FEATURES))
    return {f: cols[:, i] for i, f in enumerate(SHAPE_FEATURES)}


@dataclass
class LogisticModel:
    """P(y=1) = sigmoid(intercept + coef . expand((x - mean) / scale)), expand = the features, and with degree 2
    also their pairwise products (i <= j); optionally mapped through an isotonic curve (knots, linear between)."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    degree: int = 1
    isotonic_x: list[float] = field(default_factory=list)
    isotonic_y: list[float] = field(default_factory=list)

    @functools.cached_property
    def _arrays(self) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
        """The fields as arrays, made once (a model is never changed after it is built or loaded)."""
        return ([FEATURES.index(f) for f in self.features], np.asarray(self.mean), np.asarray(self.scale),
                np.asarray(self.coef))

    def design(self, x: np.ndarray) -> np.ndarray:
        """x [N, len(FEATURES)] -> the standardised, expanded design matrix [N, len(coef)]."""
        cols, mean, scale, _ = self._arrays
        z = (x[:, cols] - mean) / scale
        return expand(z, self.degree)

    def predict(self, x: np.ndarray) -> np.ndarray:
        logit = self.intercept + self.design(x) @ self._arrays[3]
        p = 1 / (1 + np.exp(-np.clip(logit, -40, 40)))
        if self.isotonic_x:
            p = np.interp(p, self.isotonic_x, self.isotonic_y)
        return p


def expand(z: np.ndarray, degree: int) -> np.ndarray:
    if degree == 1:
        return z
    i, j = _pairs(z.shape[1])
    return np.concatenate([z, z[:, i] * z[:, j]], 1)


@functools.cache
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n)


@dataclass
class Calibration:
    """The shipped confidence and answerable models, the NIL threshold and what they were fitted for."""

    confidence: LogisticModel
    answerable: LogisticModel
    nil_threshold: float  # nil when P(answerable) is below it
    model_version: str  # the encoders + heads they were fitted with (Linker.model_version)
    fitted_for: dict[str, Any] = field(default_factory=dict)  # index version, rerank weights, data, seed
    report: dict[str, Any] = field(default_factory=dict)  # figures measured at fit time (cross-fitted ECE, NIL)

    def assess(self, mentions: list[str], cands: np.ndarray, facts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence [B], P(answerable) [B]) for candidate score tables [B, K, len(SCORE_FIELDS)] and the top
        candidates' `entity_facts`."""
        x = features(mentions, cands, facts)
        return self.confidence.predict(x), self.answerable.predict(x)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        raw = json.loads(Path(path).read_text())
        return cls(**{**raw, "confidence": LogisticModel(**raw["confidence"]),
                      "answerable": LogisticModel(**raw["answerable"])})


@dataclass(frozen=True)
class Verdict:
    """The respond stage's confidence and NIL rule. rule "calibrated": nil when P(answerable) < threshold (the
    shipped one unless overridden); "score_threshold" (deprecated): nil when the top final score < score_threshold.
    Either way a mention with no candidate is nil with confidence None."""

    calibration: Calibration | None
    rule: str = "calibrated"
    threshold: float | None = None  # overrides calibration.nil_threshold
    score_threshold: float = 0.0
    prior: MentionPrior | None = None  # read by the answerable model (mention_facts)

    def judge(self, mentions: list[str], cands: np.ndarray, facts: np.ndarray) -> tuple[list[float | None], list[bool]]:
        """cands: the score tables; facts: the top candidates' `entity_facts`."""
        has = ~np.isnan(cands[:, 0, _F["score"]]) if cands.shape[1] else np.zeros(len(mentions), bool)
        if self.calibration is not None and len(mentions):
            conf, answerable = self.calibration.assess(mentions, cands, facts)
        else:
            conf = answerable = np.full(len(mentions), np.nan)
        if self.rule == "calibrated" and self.calibration is not None:
            t = self.calibration.nil_threshold if self.threshold is None else self.threshold
            nil = answerable < t
        else:
            nil = np.nan_to_num(cands[:, 0, _F["score"]], nan=-np.inf) < self.score_threshold if cands.shape[1] \
                else np.ones(len(mentions), bool)
        confidence = [float(c) if h and np.isfinite(c) else None for c, h in zip(conf, has)]
        return confidence, [bool(n) or not h for n, h in zip(nil, has)]
