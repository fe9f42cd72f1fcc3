"""The Linker: the one pipeline behind the HTTP routes, the jobs, the evaluation CLI and the benchmarks.

    decode (done by the caller: service.pipeline.decode) -> encode -> retrieve -> rerank -> respond

The index and the featurizer (whose projections come from the index) are held together in one
immutable snapshot; each call reads the snapshot once, so a hot swap never mixes two indexes.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from kg_index.load import KGIndex, load_index
from models.features import Featurizer, StudentFeaturizer
from models.runtime import EncoderRuntime
from service.pipeline.encode import check_deadline, encode_queries
from service.pipeline.kg_terms import KGTerms
from service.pipeline.rerank import (
    RerankConfig,
    context_name_similarity,
    name_similarity,
    ot_rerank,
    pick_device,
    student_rerank,
)
from service.pipeline.respond import build_results
from service.pipeline.retrieve import retrieve
from service.pipeline.types import LinkQuery, LinkResult, OTStats
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    index: KGIndex
    featurizer: Featurizer | StudentFeaturizer
    kg_terms: KGTerms
    source_warning: str | None = None  # served although built from another KG (EL_INDEX__ALLOW_SOURCE_MISMATCH)


def make_snapshot(runtime: EncoderRuntime, index: KGIndex, source_warning: str | None = None) -> Snapshot:
    """Mentions are encoded the way the index encoded its entities: the student's encoders or zero-shot."""
    terms = KGTerms(index.entities)
    if index.heads:
        return Snapshot(index, StudentFeaturizer(runtime, "mention"), terms, source_warning)
    assert index.projections is not None
    return Snapshot(index, Featurizer(runtime, index.projections), terms, source_warning)


def load_checked_index(settings: Settings, runtime: EncoderRuntime, folder: Path) -> tuple[KGIndex, str | None]:
    """The index at folder, refused (KGSourceMismatch) when it was built from another KG than the configured
    one, before the costlier file checks; also the warning to show when such an index is served on purpose."""
    from service.index_source import require_configured_source

    warning = require_configured_source(settings, folder)
    return load_index(folder, encoder_signature=runtime.spec.signature()), warning


@dataclass
class BatchOutcome:
    results: list[LinkResult]
    ot_stats: list[OTStats]
    timings_ms: dict[str, float]


def rerank_config(settings: Settings) -> RerankConfig:
    """The settings' rerank knobs that the rerank stage reads (every RerankConfig field, by name)."""
    return RerankConfig(**{f.name: getattr(settings.rerank, f.name) for f in fields(RerankConfig)})


# Each rerank term: the Candidate field that carries it and the RerankConfig weight that mixes it in.
RERANK_TERMS = {
    "rerank_score": "ot_weight",
    "name_score": "name_weight",
    "context_name_score": "context_name_weight",
    "name_tokens_score": "name_tokens_weight",
    "before_birth_score": "before_birth_weight",
    "after_death_score": "after_death_weight",
    "description_overlap_score": "description_overlap_weight",
}


class Linker:
    def __init__(self, settings: Settings, runtime: EncoderRuntime, index: KGIndex,
                 source_warning: str | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.model_version = f"{runtime.spec.name}@{runtime.spec.signature()}"
        self.rerank = rerank_config(settings)
        self.device = pick_device(settings.rerank.device)
        self._snapshot = make_snapshot(runtime, index, source_warning)
        self._swap_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Linker:
        """Export the encoders if needed, load and verify the index, return a ready Linker."""
        from service.encoders import export_encoders

        runtime = export_encoders(settings)
        if settings.rerank.torch_threads:
            # Small Sinkhorn batches run fastest on one thread; more threads fight ONNX Runtime for cores.
            import torch

            torch.set_num_threads(settings.rerank.torch_threads)
        index, warning = load_checked_index(settings, runtime, settings.index.dir)
        return cls(settings, runtime, index, warning)

    @property
    def index(self) -> KGIndex:
        return self._snapshot.index

    @property
    def source_warning(self) -> str | None:
        """Set while serving an index built from another KG on purpose (EL_INDEX__ALLOW_SOURCE_MISMATCH)."""
        return self._snapshot.source_warning

    def swap_index(self, folder: Path) -> KGIndex:
        """Load and verify folder, then switch to it atomically; the old index stays in use on failure."""
        with self._swap_lock:
            new, warning = load_checked_index(self.settings, self.runtime, folder)
            self._snapshot = make_snapshot(self.runtime, new, warning)
        logger.info("index swapped to %s", new.version)
        return new

    def warm_up(self) -> None:
        """Run every stage once (text and image) so the first real request pays no lazy-init costs."""
        from PIL import Image

        self.link_batch([LinkQuery("warm up", "warm-up sentence", Image.new("RGB", (32, 32)), top_k=1)])
        self.link_batch([LinkQuery("warm up", "", None, top_k=1)])

    def link(self, query: LinkQuery) -> LinkResult:
        return self.link_batch([query]).results[0]

    def link_batch(self, queries: list[LinkQuery], *, rerank: bool | None = None,
                   deadline: float | None = None) -> BatchOutcome:
        """Link a batch in one pass per stage; results in input order, each with the batch's stage timings.

        With a `deadline` (time.monotonic), stages not yet started are skipped once it has passed
        (`DeadlineExceeded`).
        """
        snap = self._snapshot  # read once: the whole batch is answered from one index
        cfg, s = self.rerank, self.settings
        do_rerank = s.rerank.enabled if rerank is None else rerank
        if not queries:
            return BatchOutcome([], [], {})
        timings: dict[str, float] = {}
        t0 = t = time.perf_counter()

        feats = encode_queries(snap.featurizer, queries, delay_ms=s.stage_delay_ms, deadline=deadline)
        timings["encode"], t = _lap(t)

        k = max(max(q.top_k for q in queries), s.rerank.candidates if do_rerank else 0)
        retrieval, rows = retrieve(snap.index, feats.global_, k)
        timings["retrieve"], t = _lap(t)

        stats: list[OTStats] = []
        terms = {"retrieval_score": retrieval}
        final = retrieval.copy()
        if do_rerank:
            check_deadline(deadline)
            cross = student_rerank if snap.index.heads else ot_rerank
            terms["rerank_score"], stats = cross(snap.index, feats, rows, cfg, self.device)
            cand_names = [[snap.index.entities[r].name for r in row if r >= 0] for row in rows]
            mentions = [q.mention for q in queries]
            terms["name_score"] = _pad(name_similarity(mentions, cand_names), retrieval.shape)
            terms["context_name_score"] = _pad(
                context_name_similarity([f"{q.mention} {q.context}" for q in queries], cand_names), retrieval.shape)
            kg = snap.kg_terms.score(mentions, [q.context for q in queries], rows)
            terms.update({f"{name}_score": values for name, values in kg.items()})
            final = cfg.retrieval_weight * retrieval
            for field, weight in RERANK_TERMS.items():
                final = final + getattr(cfg, weight) * terms[field]
            timings["rerank"], t = _lap(t)

        results = build_results(snap.index, queries, rows, terms, final,
                                nil_threshold=s.nil_threshold, model_version=self.model_version)
        timings["respond"], t = _lap(t)
        timings["total"] = (t - t0) * 1000
        for r in results:
            r.timings_ms = dict(timings)
        return BatchOutcome(results, stats, timings)

    def with_weights(self, **weights: float) -> Linker:
        """A shallow copy with other score weights (used by evaluation to report each system)."""
        other = copy.copy(self)
        other.rerank = replace(self.rerank, **weights)
        return other


def _pad(scores: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-candidate scores [B, <= K] (rows cut at their last candidate) -> [B, K], zeros after."""
    out = np.zeros(shape, np.float32)
    out[:, : scores.shape[1]] = scores
    return out


def _lap(t: float) -> tuple[float, float]:
    now = time.perf_counter()
    return (now - t) * 1000, now
