"""Evaluation rows for the OT-MEL teacher: exhaustive scoring of every KB entity, and encode timings.

The teacher works on the frozen backbone features cached by training (models/feature_cache.py, under
settings.features_dir); a fresh machine computes them here once (a few minutes for the default KB).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kg_index.build import load_entity_image
from kg_index.readers import read_kg
from kg_index.records import Mention
from models.checkpoint import STUDENT_WEIGHTS, TEACHER_WEIGHTS, load_model
from models.exhaustive import encode_kb, exhaustive_ranks
from models.feature_cache import build_cache
from models.otmel import OTMELModel
from models.train import item_tensors
from service.pipeline.linker import Linker

logger = logging.getLogger(__name__)


def _kb_folder(features_dir: Path, kg: str) -> Path:
    import hashlib

    return features_dir / ("kb" if kg == "mel" else f"kb-{hashlib.sha256(kg.encode()).hexdigest()[:8]}")


def teacher_exhaustive(linker: Linker, data_dir: Path, dataset: str, split: str, mentions: list[Mention],
                       weights: Path = TEACHER_WEIGHTS) -> tuple[list[int], float, dict, OTMELModel] | None:
    """(ranks in mention order, ms per mention, info, teacher) or None when there are no teacher weights."""
    if not weights.exists():
        logger.warning("no teacher weights at %s; skipping the teacher row", weights)
        return None
    s = linker.settings
    teacher = load_model(weights)
    runtime = linker.runtime
    entities = read_kg(s.index.kg, data_dir)
    kb = build_cache(runtime, _kb_folder(s.features_dir, s.index.kg), [e.id for e in entities],
                     [e.name for e in entities], [e.description for e in entities], [e.image for e in entities],
                     desc="caching KB features", load_image=load_entity_image)
    row = {eid: i for i, eid in enumerate(kb.ids)}
    known = [m for m in mentions if m.answer in row]
    cache = build_cache(runtime, s.features_dir / f"{dataset}-{split}{'' if len(known) == len(mentions) else '-known'}",
                        [m.id for m in known], [m.mention for m in known], [m.context for m in known],
                        [m.image for m in known], [m.answer for m in known], desc=f"caching {dataset} {split}",
                        load_image=load_entity_image)
    t0 = time.perf_counter()
    kb_enc = encode_kb(teacher, kb)
    ranks_known, stats = exhaustive_ranks(teacher, kb_enc, cache, np.asarray([row[g] for g in cache.gold]))
    ms = (time.perf_counter() - t0) * 1000 / max(len(known), 1)
    by_id = dict(zip(cache.ids, ranks_known))
    ranks = [by_id.get(m.id, 0) for m in mentions]
    info = {"kb_entities": len(kb), "pairs_total": stats.pairs_total, "pairs_solved": stats.pairs_solved,
            "note": "exact ranks over every KB entity; cross terms solved only where they can change the gold's rank"}
    logger.info("teacher: solved %d of %d cross terms", stats.pairs_solved, stats.pairs_total)
    return ranks, ms, info, teacher


def _p50(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def encode_timing(linker: Linker, teacher: OTMELModel, mentions: list[Mention], n: int = 200,
                  student_weights: Path = STUDENT_WEIGHTS) -> dict:
    """Median ms to encode one mention (batch of 1): heads alone on the same backbone features (torch,
    both), and end to end (student: its ONNX graph; teacher: ONNX backbone + torch head)."""
    runtime = linker.runtime
    student = load_model(student_weights)
    sample = mentions[:n]
    images = [load_entity_image(m.image) for m in sample]
    head_t, head_s, e2e_t, e2e_s = [], [], [], []
    with torch.no_grad():
        for i, (m, img) in enumerate(zip(sample, images)):
            t = time.perf_counter()
            runtime.encode_student("mention", [m.mention], [m.context], [img])
            e2e_s.append((time.perf_counter() - t) * 1000)

            t = time.perf_counter()
            feats = _backbone_batch(runtime, [m], [img])
            teacher.encode_mentions(*feats)
            e2e_t.append((time.perf_counter() - t) * 1000)

            for model, out in ((teacher, head_t), (student, head_s)):
                t = time.perf_counter()
                model.encode_mentions(*feats)
                out.append((time.perf_counter() - t) * 1000)
            if i < 5:  # warm-up calls do not count
                for xs in (head_t, head_s, e2e_t, e2e_s):
                    xs.pop()
    report = {"n": len(head_t), "teacher_head": _p50(head_t), "student_head": _p50(head_s),
              "teacher_end_to_end": _p50(e2e_t), "student_end_to_end": _p50(e2e_s)}
    report["head_speedup"] = round(report["teacher_head"] / max(report["student_head"], 1e-9), 2)
    report["end_to_end_speedup"] = round(report["teacher_end_to_end"] / max(report["student_end_to_end"], 1e-9), 2)
    # Batches of 64: per-op overhead amortised, what remains is the assignment itself (Sinkhorn vs softmax).
    batch = _backbone_batch(runtime, sample[:64], images[:64])
    for name, model in (("teacher", teacher), ("student", student)):
        times = []
        with torch.no_grad():
            for _ in range(7):
                t = time.perf_counter()
                model.encode_mentions(*batch)
                times.append((time.perf_counter() - t) * 1000 / len(batch[0]))
        report[f"{name}_head_batch64"] = _p50(times[2:])
    report["head_batch64_speedup"] = round(report["teacher_head_batch64"] / max(report["student_head_batch64"], 1e-9), 2)
    return report


def _backbone_batch(runtime, mentions: list[Mention], images: list) -> tuple[torch.Tensor, ...]:
    """The teacher's head inputs for these mentions, from the ONNX backbones (as the feature cache has them)."""
    from models.feature_cache import CachedItems, text_masks

    tokens, text_mask, first_mask = text_masks(runtime, [m.mention for m in mentions], [m.context for m in mentions],
                                               runtime.spec.max_tokens)
    f = runtime.encode_images(images)
    rows = np.where(f.present, np.cumsum(f.present) - 1, -1).astype(np.int32)
    items = CachedItems([m.id for m in mentions], [m.answer for m in mentions], tokens, text_mask, first_mask, rows,
                        f.global_[f.present], f.patches[f.present])
    return item_tensors(items, np.arange(len(mentions)))
