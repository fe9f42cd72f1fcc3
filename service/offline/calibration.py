"""Fit and measure the served `confidence` and NIL rule (`el fit-calibration`, `el eval`).

One pass through the served pipeline per split collects every reranked candidate's scores in served order
(`collect`); the calibrator's features come from them through the same function the respond stage uses
(service/pipeline/calibration.py: `features`), so what is fitted here is what is served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kg_index.load import EntityMeta
from kg_index.records import Mention
from service.offline.nil_protocol import FIT_SEEDS, NIL_FRACTION, NIL_SEED, nil_metrics, removed_entities
from service.pipeline.calibration import (
    FEATURES,
    SCORE_FEATURES,
    SCORE_FIELDS,
    Calibration,
    LogisticModel,
    expand,
    features,
    mention_facts,
)
from service.pipeline.linker import Linker
from service.pipeline.mention_prior import MentionPrior
from service.pipeline.types import LinkQuery

logger = logging.getLogger(__name__)

ECE_BINS = 15
CONFIDENCE_L2 = 0.01  # confidence: the score features, nearly unregularised (cross-fitted ECE 0.011-0.019 on dev)
# The mention's shape features help the answerable model but not the confidence (ECE on WikiMEL test 0.0118 with
# them against 0.0101 without, cross-fitted on dev mixed; exploratory), which keeps the score features only.
CONFIDENCE_FEATURES = SCORE_FEATURES
ANSWERABLE_L2 = 10.0  # answerable: degree-2 products of the features, regularised (per draw of removals)
MAX_H1_LOSS = 0.01  # the NIL threshold may cost at most 1 H@1 point on the answerable mentions of any dev split
THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


@dataclass
class Scored:
    """One split linked through the pipeline: each mention's reranked candidates in served order."""

    name: str  # e.g. "wikimel dev" or "wikimel dev nil" (NIL protocol)
    mentions: np.ndarray  # [M] str: the mention texts (a feature reads their token count)
    scores: np.ndarray  # [M, K, len(SCORE_FIELDS)] float32, NaN where a mention has fewer candidates
    gold: np.ndarray  # [M] int: the gold's position among the candidates, -1 when not among them
    no_answer: np.ndarray  # [M] bool: the gold is not in the KB (removed by the NIL protocol)
    facts: np.ndarray  # [M, len(FACT_FEATURES)] the KG on each top candidate and the mention prior (mention_facts)
    confidence: np.ndarray | None = None  # [M] the served confidence (NaN: null), as the pipeline answered
    said_nil: np.ndarray | None = None  # [M] bool: the served nil verdict

    @property
    def top1_right(self) -> np.ndarray:
        return self.gold == 0

    def save(self, path: Path) -> None:
        np.savez_compressed(path, name=self.name, **{f: getattr(self, f) for f in _ROWS})

    @classmethod
    def load(cls, path: Path) -> Scored:
        z = np.load(path)
        return cls(str(z["name"]), *(z[f] for f in _ROWS))

    def subset(self, keep: np.ndarray) -> Scored:
        return Scored(self.name, *(getattr(self, f)[keep] for f in _ROWS))

    @classmethod
    def concat(cls, parts: list[Scored]) -> Scored:
        """The rows of several runs (e.g. one split under several draws of removals) as one, named as the first."""
        return cls(parts[0].name, *(np.concatenate([getattr(p, f) for p in parts]) for f in _ROWS))

    def served_metrics(self) -> dict:
        """What the pipeline itself answered: ECE of its confidence (whole-KB runs), its NIL metrics (NIL runs)."""
        assert self.confidence is not None and self.said_nil is not None
        known = ~np.isnan(self.confidence)
        return {"ece": round(ece(self.confidence[known], self.top1_right[known]), 4),
                "mean_confidence": round(float(self.confidence[known].mean()), 4) if known.any() else None,
                "h@1": round(float(self.top1_right.mean()), 4),
                "nil": nil_metrics(self.no_answer, self.said_nil, self.top1_right)}

    def features(self) -> np.ndarray:
        return features(list(self.mentions), self.scores, self.facts)


_ROWS = ("mentions", "scores", "gold", "no_answer", "facts")  # Scored's per-mention arrays, in field order


def collect(linker: Linker, mentions: list[Mention], name: str, *, removed: frozenset[str] = frozenset(),
            batch: int = 64) -> Scored:
    """Link every mention with all reranked candidates returned (the KB without `removed`: NIL protocol)."""
    from kg_index.build import load_entity_image

    lk = linker.with_excluded(removed) if removed else linker
    k = lk.settings.rerank.candidates
    scores = np.full((len(mentions), k, len(SCORE_FIELDS)), np.nan, np.float32)
    gold = np.full(len(mentions), -1)
    confidence = np.full(len(mentions), np.nan)
    said_nil = np.zeros(len(mentions), bool)
    tops: list[EntityMeta | None] = [None] * len(mentions)
    for i in tqdm(range(0, len(mentions), batch), desc=name, unit="batch"):
        chunk = mentions[i : i + batch]
        out = lk.link_batch([LinkQuery(m.mention, m.context, load_entity_image(m.image), top_k=k) for m in chunk])
        for j, (m, r) in enumerate(zip(chunk, out.results)):
            confidence[i + j] = np.nan if r.confidence is None else r.confidence
            said_nil[i + j] = r.nil
            for c, cand in enumerate(r.entities):
                scores[i + j, c] = [getattr(cand, f) or 0.0 for f in SCORE_FIELDS]
                if cand.id == m.answer:
                    gold[i + j] = c
            if r.entities:
                tops[i + j] = lk.index.entities[lk.index.row_of[r.entities[0].id]]
    no_answer = np.array([m.answer in removed for m in mentions], bool)
    row_of = lk.index.row_of
    facts = mention_facts([m.mention for m in mentions], tops, lk.verdict.prior,
                          lambda e: e in row_of and e not in removed, lk.index.version, len(lk.index))
    return Scored(name, np.array([m.mention for m in mentions], dtype=str), scores, gold, no_answer, facts,
                  confidence, said_nil)


def read_labelled_mentions(path: Path) -> list[Mention]:
    """A JSONL file of labelled mentions for one's own KG, one `{"mention", "context"?, "answer"}` per line
    (`answer`: the id of the right entity in the KG), e.g. a few hundred mentions checked by hand."""
    import json

    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append(Mention(f"{path}:{n}", str(obj["mention"]), str(obj.get("context") or ""), None,
                               str(obj["answer"]), ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected {{\"mention\", \"context\"?, \"answer\"}} ({exc})") from None
    return out


def collect_pair(linker: Linker, data_dir: Path, dataset: str, split: str, *, limit: int | None = None,
                 mentions: list[Mention] | None = None, extra_seeds: tuple[int, ...] = ()) -> SplitPair:
    """One split (or the given labelled mentions) against the whole KB and under the NIL protocol (its own
    fixed-seed removal); with `extra_seeds`, also under those seeds' removals (`SplitPair.draws`, for fitting)."""
    from kg_index.readers import read_mentions

    if mentions is None:
        mentions = read_mentions(data_dir, dataset, split)
    mentions = mentions[:limit]
    if missing := sum(m.answer not in linker.index.row_of for m in mentions):
        logger.warning("%s %s: %d of %d answers are not in the index (their top-1 counts as wrong)", dataset, split,
                       missing, len(mentions))
    removed = removed_entities(m.answer for m in mentions)
    name = f"{dataset} {split}"
    full, nil = collect(linker, mentions, name), collect(linker, mentions, f"{name} nil", removed=removed)
    draws = [collect(linker, mentions, f"{name} nil", removed=removed_entities((m.answer for m in mentions), seed=s))
             for s in extra_seeds]
    return SplitPair(full, nil, draws)


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, *, degree: int = 1, l2: float = 1.0,
                 names: tuple[str, ...] = FEATURES, iters: int = 100) -> LogisticModel:
    """Weighted L2-regularised logistic regression on standardised features (Newton's method with a backtracking
    step: a full Newton step can overshoot on nearly separable data and diverge; the intercept is not penalised).
    x [N, len(FEATURES)], y [N] bool, w [N] sample weights (mean 1)."""
    cols = [FEATURES.index(f) for f in names]
    mean, scale = x[:, cols].mean(0), x[:, cols].std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = expand((x[:, cols] - mean) / scale, degree)
    a = np.concatenate([np.ones((len(z), 1)), z], 1)
    beta = np.zeros(a.shape[1])
    penalty = np.full(a.shape[1], l2)
    penalty[0] = 0.0
    y = y.astype(np.float64)

    def loss(b: np.ndarray) -> float:
        z = a @ b
        return float((w * (np.logaddexp(0.0, z) - y * z)).sum() + 0.5 * (penalty * b * b).sum())

    current = loss(beta)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(a @ beta, -40, 40)))
        grad = a.T @ (w * (p - y)) + penalty * beta
        hess = (a * (w * p * (1 - p))[:, None]).T @ a + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while (trial := loss(beta - t * step)) > current and t > 1e-6:
            t /= 2
        beta -= t * step
        done = np.abs(t * step).max() < 1e-8 or current - trial <= 1e-12 * max(1.0, abs(current))
        current = trial
        if done:
            break
    return LogisticModel(list(names), mean.tolist(), scale.tolist(), beta[1:].tolist(), float(beta[0]), degree)


def ece(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: over equal-width confidence bins, |accuracy - mean confidence| weighted by the
    bin's share of the mentions."""
    rows = reliability(p, y, bins)
    return float(sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / max(len(p), 1))


def reliability(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per non-empty bin of [0, 1]: its range, mentions, mean confidence and accuracy."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return [{"lo": b / bins, "hi": (b + 1) / bins, "n": int(k.sum()), "confidence": float(p[k].mean()),
             "accuracy": float(y[k].mean())} for b in range(bins) if (k := idx == b).any()]


def _weights(parts: list[np.ndarray]) -> np.ndarray:
    """Each split weighs the same, whatever its size."""
    w = np.concatenate([np.full(len(x), 1.0 / len(x)) for x in parts])
    return w / w.mean()


def choose_threshold(p_answerable: list[np.ndarray], nil_splits: list[Scored], today: list[np.ndarray]) -> float:
    """The threshold on P(answerable) with the best mean NIL F1 over the splits among those costing at most
    MAX_H1_LOSS of H@1 on any split's answerable mentions (`today`: their top-1 right against the whole KB)."""
    best, best_f1 = 0.0, -1.0
    for t in THRESHOLDS:
        ms = [nil_metrics(s.no_answer, p < t, s.top1_right) for p, s in zip(p_answerable, nil_splits)]
        if all(float(r[~s.no_answer].mean()) - m["h@1_answerable"] <= MAX_H1_LOSS + 1e-9
               for m, s, r in zip(ms, nil_splits, today)):
            f1 = float(np.mean([m["nil_f1"] for m in ms]))
            if f1 > best_f1:
                best, best_f1 = float(t), f1
    return best


@dataclass
class SplitPair:
    """One split linked against the whole KB (`full`) and under the NIL protocol (`nil`), same mentions; `draws`:
    the same mentions under other seeds' removals, which the answerable model is also fitted on (more NIL
    mentions and other namesakes left in the KB than one draw gives)."""

    full: Scored
    nil: Scored
    draws: list[Scored] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.full.name

    def subset(self, keep: np.ndarray) -> SplitPair:
        return SplitPair(self.full.subset(keep), self.nil.subset(keep), [d.subset(keep) for d in self.draws])

    @property
    def nil_all(self) -> Scored:
        """The NIL-protocol run and every draw, as one."""
        return Scored.concat([self.nil, *self.draws])

    @property
    def today_all(self) -> np.ndarray:
        """Top-1 right against the whole KB, once per row of `nil_all`."""
        return np.tile(self.full.top1_right, 1 + len(self.draws))


def fit_models(pairs: list[SplitPair]) -> tuple[LogisticModel, LogisticModel, float]:
    """The confidence model (top-1 right, whole KB), the answerable model (NIL protocol) and the NIL threshold."""
    conf = fit_logistic(np.concatenate([p.full.features() for p in pairs]),
                        np.concatenate([p.full.top1_right for p in pairs]), _weights([p.full.gold for p in pairs]),
                        l2=CONFIDENCE_L2, names=CONFIDENCE_FEATURES)
    nils = [p.nil_all for p in pairs]
    draws = 1 + len(pairs[0].draws)  # rows per mention: a penalty scaled by it weighs as much as with one draw
    answerable = fit_logistic(np.concatenate([n.features() for n in nils]),
                              np.concatenate([~n.no_answer for n in nils]), _weights([n.gold for n in nils]),
                              degree=2, l2=ANSWERABLE_L2 * draws, names=FEATURES)
    threshold = choose_threshold([answerable.predict(n.features()) for n in nils], nils,
                                 [p.today_all for p in pairs])
    return conf, answerable, threshold


def measure(pair: SplitPair, conf: LogisticModel, answerable: LogisticModel, threshold: float) -> dict:
    """ECE of the confidence on the split (whole KB) and the NIL metrics of the rule under the NIL protocol, with
    H@1 of the answerable mentions against the whole KB without any NIL verdict (`h@1_answerable_today`)."""
    p = conf.predict(pair.full.features())
    said_nil = answerable.predict(pair.nil.features()) < threshold
    nil = nil_metrics(pair.nil.no_answer, said_nil, pair.nil.top1_right)
    nil["h@1_answerable_today"] = round(float(pair.full.top1_right[~pair.nil.no_answer].mean()), 4)
    nil["h@1_points_vs_today"] = round(100 * (nil["h@1_answerable"] - nil["h@1_answerable_today"]), 2)
    return {"n_mentions": len(p), "ece": round(ece(p, pair.full.top1_right), 4),
            "mean_confidence": round(float(p.mean()), 4), "h@1": round(float(pair.full.top1_right.mean()), 4),
            "nil": nil}


def cross_fit(pairs: list[SplitPair], seed: int = 0) -> dict[str, dict]:
    """Out-of-sample figures on the dev splits themselves: each split cut in two halves (fixed seed); fit on one
    half of every split, measure on the other halves, and the other way round; figures over the pooled halves."""
    rng = np.random.default_rng(seed)
    halves = [rng.random(len(p.full.gold)) < 0.5 for p in pairs]
    p_conf = [np.zeros(len(h)) for h in halves]
    p_ans = [np.zeros(len(h)) for h in halves]
    said = [np.zeros(len(h), bool) for h in halves]
    for side in (True, False):
        train = [p.subset(h == side) for p, h in zip(pairs, halves)]
        conf, answerable, t = fit_models(train)
        for i, (p, h) in enumerate(zip(pairs, halves)):
            rest = h != side
            p_conf[i][rest] = conf.predict(p.full.subset(rest).features())
            p_ans[i][rest] = answerable.predict(p.nil.subset(rest).features())
            said[i][rest] = p_ans[i][rest] < t
    out = {}
    for p, pc, s in zip(pairs, p_conf, said):
        nil = nil_metrics(p.nil.no_answer, s, p.nil.top1_right)
        nil["h@1_answerable_today"] = round(float(p.full.top1_right[~p.nil.no_answer].mean()), 4)
        nil["h@1_points_vs_today"] = round(100 * (nil["h@1_answerable"] - nil["h@1_answerable_today"]), 2)
        out[p.name] = {"ece": round(ece(pc, p.full.top1_right), 4), "nil": nil}
    return out


def fit_calibration(pairs: list[SplitPair], model_version: str, fitted_for: dict) -> Calibration:
    """Fit on every given split; the report holds the in-sample figures, the cross-fitted ones (`cross_fit`) and,
    for comparison, the ECE of a Platt calibration on the top score alone."""
    conf, answerable, threshold = fit_models(pairs)
    platt = fit_logistic(np.concatenate([p.full.features() for p in pairs]),
                         np.concatenate([p.full.top1_right for p in pairs]), _weights([p.full.gold for p in pairs]),
                         l2=CONFIDENCE_L2, names=("top",))
    report = {"in_sample": {p.name: measure(p, conf, answerable, threshold) for p in pairs},
              "cross_fitted": cross_fit(pairs),
              "platt_top_score_only_ece": {p.name: round(ece(platt.predict(p.full.features()), p.full.top1_right), 4)
                                           for p in pairs}}
    return Calibration(conf, answerable, threshold, model_version, fitted_for, report)


def plot_reliability(rows: list[dict], title: str, path: Path) -> None:
    """Reliability diagram from `reliability` rows: accuracy against mean confidence per bin (the diagonal is perfect
    calibration), with the share of mentions per bin below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(sum(r["n"] for r in rows), 1)
    error = sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / n
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    ax.bar([(r["lo"] + r["hi"]) / 2 for r in rows], [r["accuracy"] for r in rows], width=1 / ECE_BINS,
           edgecolor="black", alpha=0.6, label="accuracy of the top entity")
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-", c="C3", ms=3,
            label="(mean confidence, accuracy)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: ECE {error:.3f} ({n} mentions)")
    ax.legend(loc="upper left", fontsize=8)
    bx.bar([(r["lo"] + r["hi"]) / 2 for r in rows], [r["n"] / n for r in rows], width=1 / ECE_BINS, edgecolor="black")
    bx.set_yscale("log")
    bx.set_xlabel("confidence")
    bx.set_ylabel("share")
    bx.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_fit(linker: Linker, data_dir: Path, datasets: list[str], split: str = "dev", *,
            limit: int | None = None, files: list[Path] | None = None) -> tuple[Calibration, MentionPrior]:
    """`el fit-calibration`: link each split (whole KB, then the NIL protocol) and fit on all of them; with
    `files` (JSONL of labelled mentions, `read_labelled_mentions`), each file is a split instead. The answerable
    model sees each split under every seed of FIT_SEEDS (the protocol's own first)."""
    extra = tuple(s for s in FIT_SEEDS if s != NIL_SEED)
    # The prior comes from the benchmarks' train splits; fitted on one's own labelled files, there is none.
    prior = MentionPrior({}, ["none: fitted on labelled files"]) if files else build_prior(data_dir, datasets)
    linker = linker.with_excluded(frozenset())  # a copy, to collect the features with the new prior
    linker.verdict = replace(linker.verdict, prior=prior)
    if files:
        pairs = [collect_pair(linker, data_dir, Path(f).stem, "labelled", limit=limit,
                              mentions=read_labelled_mentions(Path(f)), extra_seeds=extra) for f in files]
    else:
        pairs = [collect_pair(linker, data_dir, ds, split, limit=limit, extra_seeds=extra) for ds in datasets]
    r = linker.rerank
    fitted_for = {"index_version": linker.index.version, "kb_size": len(linker.index),
                  "splits": [p.name for p in pairs], "limit": limit,
                  "nil_protocol": {"fraction": NIL_FRACTION, "seed": NIL_SEED, "fit_seeds": list(FIT_SEEDS)},
                  "rerank": {"candidates": linker.settings.rerank.candidates, "retrieval_weight": r.retrieval_weight,
                             **{t: getattr(r, t) for t in ("ot_weight", "name_weight", "context_name_weight",
                                                          "name_tokens_weight", "before_birth_weight",
                                                          "after_death_weight", "description_overlap_weight")}},
                  "skip_margin": linker.skip_margin,
                  "mention_prior": {"sources": prior.sources, "forms": len(prior.table)}}
    return fit_calibration(pairs, linker.model_version, fitted_for), prior


def build_prior(data_dir: Path, datasets: list[str]) -> MentionPrior:
    """The mention prior from the train splits of the benchmarks (never their dev or test mentions)."""
    from kg_index.readers import read_mentions

    pairs, sources = [], []
    for ds in datasets:
        held = set()  # a sample a release lists in train and in dev or test (WikiDiverse: 8) stays out
        for split in ("dev", "test"):
            try:
                held |= {m.id for m in read_mentions(data_dir, ds, split)}
            except (FileNotFoundError, ValueError):  # a release without that split
                pass
        train = [m for m in read_mentions(data_dir, ds, "train") if m.id not in held]
        pairs += [(m.mention, m.answer) for m in train]
        sources.append(f"{ds} train ({len(train)} mentions)")
    prior = MentionPrior.from_mentions(pairs, sources)
    logger.info("mention prior: %d surface forms from %s", len(prior.table), ", ".join(sources))
    return prior
