"""Evaluation: rank every mention of a benchmark split against the whole KB, per system.

Systems: (a) exact-name match, (b) retrieval only, (c) retrieval + OT rerank, (d) retrieval + OT rerank +
surface-form score (the served default), each with the index's features (the trained student's, or
zero-shot); with the student also (e) the OT-MEL teacher scoring every KB entity (the paper's protocol,
models/exhaustive.py) and the encode time per mention of teacher and student. Metrics H@1, H@3, H@5 and
MRR; for (b)-(d) ranks beyond the reranked candidate list (settings.rerank.candidates) count as misses.
Confidence and NIL (`confidence_and_nil`): the ECE of the served confidence with its reliability diagram, and the
served NIL rule's precision, recall and F1 under the NIL protocol (service/offline/nil_protocol.py).
What OT adds: `retrieval+name+kg` is the served score without the OT term (no solve at all), and with a skip
margin (EL_RERANK__SKIP_MARGIN or `el eval --skip-margin`) the `adaptive` row is the served score with the OT
solve skipped where the rest is decisive (its share skipped and rerank time beside it).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kg_index.readers import read_mentions
from kg_index.records import Mention
from models.rank_metrics import rank_metrics
from service.offline.bench import machine_info
from service.pipeline.linker import Linker
from service.pipeline.terms import TERMS, ablations
from service.pipeline.types import LinkQuery

logger = logging.getLogger(__name__)

KS = (1, 3, 5)
SERVED = list(ablations())[-1]  # every term: the served score
NO_OT = "retrieval+name+kg"  # the served score without the OT term
ADAPTIVE = "adaptive"  # the served score, OT solved only where the rest is not decisive (skip margin)


@dataclass
class SystemScores:
    n_mentions: int
    kb_size: int
    ranks: list[int]  # 1-based rank of the gold entity, 0 when not in the list

    def summary(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"n_mentions": self.n_mentions, "kb_size": self.kb_size}
        out.update({name: round(v, 4) for name, v in rank_metrics(self.ranks, KS).items()})
        return out


def exact_name_ranks(mentions: list[Mention], ids: list[str], names: list[str]) -> list[int]:
    """Entities whose lower-cased name equals the mention, in KB order; the gold's position among them."""
    by_name: dict[str, list[str]] = defaultdict(list)
    for entity_id, name in zip(ids, names):
        by_name[name.strip().lower()].append(entity_id)
    ranks = []
    for m in mentions:
        matches = by_name.get(m.mention.strip().lower(), [])
        ranks.append(matches.index(m.answer) + 1 if m.answer in matches else 0)
    return ranks


def _linker_ranks(linker: Linker, mentions: list[Mention], *, rerank: bool, k: int, batch: int,
                  desc: str, load_image) -> tuple[list[int], dict[str, float]]:
    """Gold ranks, and per mention: ms in all, ms in the rerank stage, share of OT solves skipped."""
    ranks: list[int] = []
    rerank_ms, skipped = 0.0, 0
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(mentions), batch), desc=desc, unit="batch"):
        chunk = mentions[i : i + batch]
        queries = [LinkQuery(m.mention, m.context, load_image(m.image), top_k=k) for m in chunk]
        out = linker.link_batch(queries, rerank=rerank)
        rerank_ms += out.timings_ms.get("rerank", 0.0)
        skipped += out.ot_skipped
        for m, r in zip(chunk, out.results):
            ids = [c.id for c in r.entities]
            ranks.append(ids.index(m.answer) + 1 if m.answer in ids else 0)
    n = max(len(mentions), 1)
    return ranks, {"ms_per_mention": round((time.perf_counter() - t0) * 1000 / n, 3),
                   "rerank_ms_per_mention": round(rerank_ms / n, 3), "ot_skipped_share": round(skipped / n, 4)}


def evaluate(linker: Linker, data_dir: Path, dataset: str, split: str, *, batch: int = 64,
             limit: int | None = None, teacher: bool = True, skip_margin: float | None = None) -> dict:
    """Every system's metrics on a split. The ablation rows always solve OT; skip_margin (default: the linker's
    EL_RERANK__SKIP_MARGIN) adds the `adaptive` row."""
    from kg_index.build import load_entity_image

    mentions = read_mentions(data_dir, dataset, split)
    if limit:
        mentions = mentions[:limit]
    index = linker.index
    kb_size = len(index)
    missing = sum(m.answer not in index.row_of for m in mentions)
    if missing:
        logger.warning("%d gold entities are not in the index (they count as misses)", missing)
    k = linker.settings.rerank.candidates
    systems: dict[str, dict] = {}
    t0 = time.perf_counter()
    exact = exact_name_ranks(mentions, index.ids, [e.name for e in index.entities])
    systems["exact_name"] = SystemScores(len(mentions), kb_size, exact).summary()
    systems["exact_name"]["ms_per_mention"] = round((time.perf_counter() - t0) * 1000 / max(len(mentions), 1), 3)
    # retrieval alone, then one row per group of terms added (retrieval+ot, ...; the last one is the served score),
    # then the served score without OT (no solve: what OT adds) and, given a margin, the adaptive rerank
    full = linker.with_skip_margin(None)
    variants = {"retrieval": (full, False), **{name: (full.with_weights(**zeroed), True)
                                               for name, zeroed in ablations().items()},
                NO_OT: (linker.with_skip_margin(float("-inf")), True)}
    margin = linker.skip_margin if skip_margin is None else skip_margin
    if margin is not None:
        variants[ADAPTIVE] = (linker.with_skip_margin(margin), True)
    for name, (lk, rerank) in variants.items():
        ranks, timing = _linker_ranks(lk, mentions, rerank=rerank, k=k, batch=batch, desc=name,
                                      load_image=load_entity_image)
        systems[name] = SystemScores(len(mentions), kb_size, ranks).summary()
        systems[name].update(timing if rerank else {"ms_per_mention": timing["ms_per_mention"]})
    extra: dict = {"what_ot_adds": what_ot_adds(systems)}
    if margin is not None:
        extra["what_ot_adds"]["skip_margin"] = margin
    extra.update(confidence_and_nil(linker, mentions, f"{dataset} {split}"))
    if index.heads and teacher:
        from service.offline.evaluation_teacher import encode_timing, teacher_exhaustive

        out = teacher_exhaustive(linker, data_dir, dataset, split, mentions, timed=False)
        if out is not None:
            ranks, ms, info, model = out
            systems["teacher_exhaustive"] = SystemScores(len(mentions), kb_size, ranks).summary()
            systems["teacher_exhaustive"]["ms_per_mention"] = round(ms, 3)
            extra["teacher_exhaustive"] = info
            extra["encode_ms_per_mention"] = encode_timing(linker, model, mentions)
    return {
        "dataset": dataset, "split": split, "n_mentions": len(mentions), "kb_size": kb_size,
        "features": "student" if index.heads else "zero-shot",
        "mention_encoder": "int8" if linker.runtime.spec.int8_mentions else "fp32", **extra,
        "index_version": index.version, "model_version": linker.model_version,
        "rerank": {"candidates": k, "eps": linker.rerank.eps, "retrieval_weight": linker.rerank.retrieval_weight,
                   **{t.weight: getattr(linker.rerank, t.weight) for t in TERMS}},
        "systems": systems,
        "machine": machine_info(linker.runtime.providers),  # ms_per_mention compares only within one machine
    }


def confidence_and_nil(linker: Linker, mentions: list[Mention], name: str) -> dict:
    """The served confidence's calibration on the split (ECE, reliability bins) and the served NIL rule under the
    NIL protocol (service/offline/nil_protocol.py): NIL precision, recall, F1 and H@1 on the answerable mentions,
    beside their H@1 against the whole KB without any NIL verdict (`h@1_answerable_today`)."""
    from service.offline.calibration import collect, reliability
    from service.offline.nil_protocol import NIL_FRACTION, NIL_SEED, removed_entities

    full = collect(linker, mentions, name)
    removed = removed_entities(m.answer for m in mentions)
    masked = collect(linker, mentions, f"{name} nil", removed=removed)
    served = full.served_metrics()
    cal = linker.verdict.calibration
    known = ~np.isnan(full.confidence)  # null only without entities
    calibration: dict = {"ece": served["ece"], "mean_confidence": served["mean_confidence"], "h@1": served["h@1"],
                         "bins": reliability(full.confidence[known], full.top1_right[known])}
    if cal is not None:  # dev splits the calibration was fitted on: the ECE above is in-sample
        calibration["in_sample"] = name in cal.fitted_for.get("splits", [])
        if name in cal.report.get("cross_fitted", {}):
            calibration["cross_fitted_ece"] = cal.report["cross_fitted"][name]["ece"]
    nil = masked.served_metrics()["nil"]
    nil["h@1_answerable_today"] = round(float(full.top1_right[~masked.no_answer].mean()), 4)
    nil["h@1_points_vs_today"] = round(100 * (nil["h@1_answerable"] - nil["h@1_answerable_today"]), 2)
    v = linker.verdict
    nil["rule"] = v.rule if cal is not None else "score_threshold"
    nil["threshold"] = (v.threshold if v.threshold is not None else cal.nil_threshold) \
        if nil["rule"] == "calibrated" and cal is not None else v.score_threshold
    nil["protocol"] = {"fraction": NIL_FRACTION, "seed": NIL_SEED, "removed_entities": len(removed)}
    return {"calibration": calibration, "nil": nil}


def what_ot_adds(systems: dict[str, dict]) -> dict[str, float]:
    """OT's gain in H@1 points over the served score without it, and its cost in rerank ms per mention; the same
    for the adaptive row (the H@1 it gives up against always solving, the rerank time it saves)."""
    served, no_ot = systems[SERVED], systems[NO_OT]
    out = {"h1_points": round(100 * (served["h@1"] - no_ot["h@1"]), 2),
           "rerank_ms_per_mention": served["rerank_ms_per_mention"],
           "rerank_ms_per_mention_without": no_ot["rerank_ms_per_mention"]}
    if ADAPTIVE in systems:
        a = systems[ADAPTIVE]
        out.update({"adaptive_skipped_share": a["ot_skipped_share"],
                    "adaptive_h1_points_vs_served": round(100 * (a["h@1"] - served["h@1"]), 2),
                    "adaptive_rerank_time_ratio": round(a["rerank_ms_per_mention"]
                                                        / max(served["rerank_ms_per_mention"], 1e-9), 3)})
    return out


def format_table(report: dict) -> str:
    head = f"{report['dataset']} {report['split']}: {report['n_mentions']} mentions, KB {report['kb_size']}"
    head += f" ({report.get('features', 'zero-shot')} features)"
    lines = [head, f"{'system':<20} {'H@1':>7} {'H@3':>7} {'H@5':>7} {'MRR':>7} {'ms/mention':>11}"]
    for name, s in report["systems"].items():
        lines.append(f"{name:<20} {s['h@1']:>7.4f} {s['h@3']:>7.4f} {s['h@5']:>7.4f} {s['mrr']:>7.4f} {s['ms_per_mention']:>11.3f}")
    if "what_ot_adds" in report:
        lines.append("what OT adds: " + json.dumps(report["what_ot_adds"]))
    if "encode_ms_per_mention" in report:
        lines.append("encode ms/mention: " + json.dumps(report["encode_ms_per_mention"]))
    if "calibration" in report:
        c = report["calibration"]
        lines.append(f"confidence: ECE {c['ece']:.4f}" + (" (in-sample: fitted on this split" + (
            f"; cross-fitted {c['cross_fitted_ece']:.4f})" if "cross_fitted_ece" in c else ")")
            if c.get("in_sample") else ""))
    if "nil" in report:
        n = report["nil"]
        lines.append(f"NIL ({n['n_nil']} of {n['n_mentions']} mentions without answer): precision "
                     f"{n['nil_precision']:.4f} recall {n['nil_recall']:.4f} F1 {n['nil_f1']:.4f}; H@1 answerable "
                     f"{n['h@1_answerable']:.4f} (whole KB, no NIL rule: {n['h@1_answerable_today']:.4f})")
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if report.get("features", "student") == "student" else "-zeroshot"
    suffix += "-int8" if report.get("mention_encoder") == "int8" else ""  # never overwrites the fp32 report
    stem = f"eval-{report['dataset']}-{report['split']}{suffix}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2))
    plot = out_dir / f"{stem}.png"
    _plot(report, plot)
    if "calibration" in report:  # the reliability diagram of the served confidence
        from service.offline.calibration import plot_reliability

        plot_reliability(report["calibration"]["bins"], f"{report['dataset']} {report['split']}",
                         out_dir / f"{stem}-reliability.png")
    return path, plot


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["h@1", "h@3", "h@5", "mrr"]
    systems = list(report["systems"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(systems)
    for i, name in enumerate(systems):
        vals = [report["systems"][name][m] for m in metrics]
        ax.bar(np.arange(len(metrics)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(systems) - 1) / 2, [m.upper() for m in metrics])
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['dataset']} {report['split']} ({report['n_mentions']} mentions, KB {report['kb_size']})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
