"""`el train`: read the benchmarks, cache their frozen backbone features, hand them to the model-side training.

The data side of training lives here: the KB and the training and dev splits come from the MEL release files
(kg_index.readers) with their images (kg_index.build.load_entity_image), become plain `Records`, and are
encoded once into feature caches (models/feature_cache.py). models/train.py then trains the teacher and the
student on those arrays (`Data`) and never reads a benchmark file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kg_index.build import load_entity_image
from kg_index.readers import read_mel_kb, read_mentions
from models.feature_cache import CachedItems, InnerLayerText, blank_image_features, build_cache, inner_backbone
from models.runtime import EncoderRuntime
from models.student import StudentConfig
from models.train import DEV_SPLIT, Data, TrainConfig, concat_items, student_depth, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Records:
    """What one feature cache is built from, field by field: KB entities (name, description, image) or the
    mentions of a split (mention, sentence, image, gold entity id)."""

    ids: list[str]
    first: list[str]
    second: list[str]
    images: list[Path | None]
    gold: list[str] = field(default_factory=list)  # empty for the KB

    def __len__(self) -> int:
        return len(self.ids)


def kb_records(data_dir: Path) -> Records:
    """The union of the three MEL knowledge bases (the default KG)."""
    entities = read_mel_kb(data_dir)
    return Records([e.id for e in entities], [e.name for e in entities], [e.description for e in entities],
                   [e.image for e in entities])


def split_records(data_dir: Path, dataset: str, split: str, known: Container[str]) -> Records:
    """The split's mentions whose gold entity is `known` (in the KB): the others can be neither trained nor scored."""
    ms = [m for m in read_mentions(data_dir, dataset, split) if m.answer in known]
    return Records([m.id for m in ms], [m.mention for m in ms], [m.context for m in ms], [m.image for m in ms],
                   [m.answer for m in ms])


def _cache(runtime: EncoderRuntime, folder: Path, records: Records, desc: str,
           inner: InnerLayerText | None = None) -> CachedItems:
    return build_cache(runtime, folder, records.ids, records.first, records.second, records.images, records.gold,
                       desc=desc, load_image=load_entity_image, inner=inner)


def prepare(cfg: TrainConfig, runtime: EncoderRuntime, depth: StudentConfig) -> Data:
    """Cache the KB and the splits' backbone features (progress bars), map answers to KB rows; for a shallow
    student (`depth`), also its mention inputs: the splits' states of its frozen layer."""
    kb = _cache(runtime, cfg.cache_dir / "kb", kb_records(cfg.data_dir), "caching KB")
    row = {eid: i for i, eid in enumerate(kb.ids)}
    splits = {(ds, sp): split_records(cfg.data_dir, ds, sp, row) for ds, sp in (*cfg.train_splits, DEV_SPLIT)}

    def split_cache(ds: str, sp: str, inner: InnerLayerText | None = None) -> CachedItems:
        suffix = f"-layer{inner.layer}" if inner else ""
        return _cache(runtime, cfg.cache_dir / f"{ds}-{sp}{suffix}", splits[ds, sp], f"caching {ds} {sp}{suffix}", inner)

    train_items = concat_items([split_cache(ds, sp) for ds, sp in cfg.train_splits])
    dev = split_cache(*DEV_SPLIT)
    data = Data(kb, train_items, dev, np.asarray([row[g] for g in train_items.gold]),
                np.asarray([row[g] for g in dev.gold]), blank_image_features(runtime))
    if depth.mention_layers:
        data.inner_bert = inner_backbone(runtime)
        inner = InnerLayerText(runtime, data.inner_bert, depth.frozen_layers)
        data.student_mentions = (concat_items([split_cache(ds, sp, inner) for ds, sp in cfg.train_splits]),
                                 split_cache(*DEV_SPLIT, inner))
    return data


def run(cfg: TrainConfig, runtime: EncoderRuntime, *, threads: int = 0) -> dict:
    """Prepare the data, then train teacher and student (models/train.py); returns the training summary."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    depth = student_depth(cfg)  # first: a bad depth fails before minutes of caching
    data = prepare(cfg, runtime, depth)
    cache_s = time.perf_counter() - t0
    logger.info("features ready in %.0fs: %d training mentions, %d dev, %d KB entities", cache_s,
                len(data.train_gold), len(data.dev_gold), len(data.kb))
    return train(cfg, runtime.spec, data, depth, cache_s=cache_s)
