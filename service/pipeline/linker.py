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
from concurrent.futures import Executor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kg_index.exact import configure_coarse, configure_int8, spare_core
from kg_index.live import Change, EntityRow, rows_from_features
from kg_index.live_store import LiveStore
from kg_index.load import EntityMeta, KGIndex, load_index
from models.features import Features, Featurizer, StudentFeaturizer
from models.runtime import EncoderRuntime
from service.pipeline.calibration import Calibration, Verdict
from service.pipeline.encode import check_deadline, encode_queries
from service.pipeline.explain import PlanRecorder, explanations
from service.pipeline.halves import Occupancy, in_halves
from service.pipeline.kg_terms import KGTerms, LayeredKGTerms
from service.pipeline.mention_prior import PRIOR_FEATURES, MentionPrior, prior_path
from service.pipeline.rerank import (
    CrossScorer,
    RerankConfig,
    ot_rerank,
    pick_device,
    student_rerank,
    timed,
)
from service.pipeline.respond import build_results
from service.pipeline.retrieve import retrieve
from service.pipeline.strings import string_terms
from service.pipeline.terms import mix
from service.pipeline.types import RERANK_STAGES, LinkQuery, LinkResult, OTStats
from service.settings import Settings

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """One index with what is bound to it: how mentions are encoded, which cross scorer compares them with the
    candidates (both follow from the index's features: the student's or zero-shot) and the KG terms' statistics."""

    index: KGIndex
    featurizer: Featurizer | StudentFeaturizer
    cross: CrossScorer
    kg_terms: KGTerms | LayeredKGTerms
    source_warning: str | None = None  # served although built from another KG (EL_INDEX__ALLOW_SOURCE_MISMATCH)

    def score_terms(self, queries: list[LinkQuery], feats: Features, rows: np.ndarray, cfg: RerankConfig,
                    device: torch.device, timings: dict[str, float] | None = None,
                    ) -> tuple[dict[str, np.ndarray], list[OTStats]]:
        """Every rerank term (terms.TERMS) for the candidate rows [B, K], by field, and the solver's stats.

        With `timings`, the time of each sub-stage (rerank.RERANK_STAGES) is added to it, in ms."""
        cross, stats = self.cross(self.index, feats, rows, cfg, device, timings)
        return {"rerank_score": cross, **self.cheap_terms(queries, rows, timings)}, stats

    def cheap_terms(self, queries: list[LinkQuery], rows: np.ndarray,
                    timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """The terms other than the cross scorer's (strings and KG facts: no solver), by field, [B, K] each."""
        mentions, contexts = [q.mention for q in queries], [q.context for q in queries]
        with timed(timings, "rerank_strings"):
            names = [[self.index.entities[r].name for r in row if r >= 0] for row in rows]
            strings = string_terms(mentions, contexts, names, rows.shape)
        with timed(timings, "rerank_kg"):
            kg = self.kg_terms.score(mentions, contexts, rows)
        return {**strings, **kg}


def make_snapshot(runtime: EncoderRuntime, index: KGIndex, source_warning: str | None = None,
                  kg_terms: KGTerms | LayeredKGTerms | None = None) -> Snapshot:
    """Mentions are encoded the way the index encoded its entities, the student's encoders or zero-shot, and
    compared with the cross scorer of those features; chosen here, once per index (and per change of a live one:
    `kg_terms` then layers the appended rows' terms over the base's)."""
    terms = kg_terms if kg_terms is not None else KGTerms(index.entities)
    if index.heads:
        return Snapshot(index, StudentFeaturizer(runtime, "mention"), student_rerank, terms, source_warning)
    assert index.projections is not None
    return Snapshot(index, Featurizer(runtime, index.projections), ot_rerank, terms, source_warning)


def load_checked_index(settings: Settings, runtime: EncoderRuntime, folder: Path) -> tuple[KGIndex, str | None]:
    """The index at folder, refused (KGSourceMismatch) when it was built from another KG than the configured
    one, before the costlier file checks; also the warning to show when such an index is served on purpose."""
    from service.index_source import require_configured_source

    warning = require_configured_source(settings, folder)
    return load_index(folder, encoder_signature=runtime.spec.signature()), warning


def top_margin(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per mention [B]: its best candidate's score minus its second's (inf with fewer than two candidates)."""
    s = np.where(rows >= 0, scores, -np.inf)
    if s.shape[1] < 2:
        return np.full(s.shape[0], np.inf)
    top2 = -np.sort(-s, axis=1)[:, :2]
    with np.errstate(invalid="ignore"):
        margin = top2[:, 0] - top2[:, 1]
    return np.where(np.isfinite(top2[:, 1]), margin, np.inf)


def adaptive_terms(snap: Snapshot, queries: list[LinkQuery], feats: Features, rows: np.ndarray,
                   retrieval: np.ndarray, cfg: RerankConfig, device: torch.device, skip_margin: float | None,
                   timings: dict[str, float] | None = None, recorder: PlanRecorder | None = None,
                   ) -> tuple[dict[str, np.ndarray], list[OTStats], np.ndarray]:
    """Every rerank term, the solver's stats and which mentions skipped the cross scorer ([B] bool).

    The cheap terms are computed for every mention; the cross scorer (the OT solves, most of the rerank's
    cost) only for those whose score without it (retrieval + cheap terms, mixed) has its top-1 ahead of its
    top-2 by at most `skip_margin`: elsewhere the order is taken as decided and the cross term is 0 (which,
    within one mention, ranks exactly as an OT weight of 0). None never skips; -inf skips every mention.
    A `recorder` (explain=true) receives the plans of the mentions it wants that were solved."""
    cheap = snap.cheap_terms(queries, rows, timings)
    cross = np.zeros(rows.shape, np.float32)
    if skip_margin is None:
        skip = np.zeros(len(queries), bool)
    else:
        skip = top_margin(mix(cfg, retrieval, {"rerank_score": cross, **cheap}), rows) > skip_margin
    stats: list[OTStats] = []
    keep = np.flatnonzero(~skip)
    if len(keep) == len(queries):
        cross, stats = snap.cross(snap.index, feats, rows, cfg, device, timings, **_rec(recorder))
    elif len(keep):
        sub = replace(feats, **{f.name: getattr(feats, f.name)[keep] for f in fields(feats)
                                if getattr(feats, f.name) is not None})
        sub_rec = recorder.sub(keep) if recorder is not None else None
        cross[keep], stats = snap.cross(snap.index, sub, rows[keep], cfg, device, timings, **_rec(sub_rec))
        if recorder is not None and sub_rec is not None:
            recorder.merge(sub_rec, keep)
    return {"rerank_score": cross, **cheap}, stats, skip


def _rec(recorder: PlanRecorder | None) -> dict[str, PlanRecorder]:
    """The recorder keyword for a cross scorer, only when there is one (scorers without explain support still run)."""
    return {"recorder": recorder} if recorder is not None else {}


@dataclass
class BatchOutcome:
    results: list[LinkResult]
    ot_stats: list[OTStats]
    timings_ms: dict[str, float]
    ot_skipped: int = 0  # mentions whose cross scorer was skipped (EL_RERANK__SKIP_MARGIN: retrieval decisive)


class Linker:
    def __init__(self, settings: Settings, runtime: EncoderRuntime, index: KGIndex,
                 source_warning: str | None = None, *, live: bool = False) -> None:
        """`live`: open the index folder's change log (replaying it) so that entities can change while serving
        (`apply_changes`, `compact`), and follow the changes other processes serving the folder log."""
        self.settings = settings
        self.runtime = runtime
        self.model_version = f"{runtime.spec.name}@{runtime.spec.signature()}"
        self.rerank = RerankConfig.from_settings(settings.rerank)
        self.skip_margin = settings.rerank.skip_margin
        self.excluded: frozenset[str] = frozenset()  # evaluation only (with_excluded): entities masked out of the KB
        self.device = pick_device(settings.rerank.device)
        self._swap_lock = threading.RLock()  # index swaps, entity changes and compaction's swap: one at a time
        self._base_terms = KGTerms(index.entities)
        self._base_terms_version = index.manifest.version
        self._snapshot = make_snapshot(runtime, index, source_warning, self._base_terms)
        self.verdict = load_verdict(settings, self.model_version)
        self.store: LiveStore | None = None
        self._entity_runtime: EncoderRuntime | None = None
        self._entity_runtime_lock = threading.Lock()
        self._occupancy = Occupancy()  # shared by the copies (with_weights, ...): batches in flight
        if live:
            self.store = LiveStore(index, lock=self._swap_lock, publish=self._publish,
                                   encoder_signature=runtime.spec.signature(), loader=self._load_folder)

    def _load_folder(self, folder: Path) -> KGIndex:
        """A folder another process swapped in at the served path, with the checks of a reload."""
        return load_checked_index(self.settings, self.runtime, folder)[0]

    def _publish(self, index: KGIndex) -> None:
        """A live index changed (called under the swap lock): serve the new snapshot from the next batch on."""
        if index.manifest.version != self._base_terms_version:  # a new base folder (compaction, reload)
            n_base = len(index.entities) if index.delta is None else index.delta.n_base
            self._base_terms = KGTerms(index.entities[:n_base])
            self._base_terms_version = index.manifest.version
        if index.delta is None:
            terms: KGTerms | LayeredKGTerms = self._base_terms
        else:
            previous = self._snapshot.kg_terms if isinstance(self._snapshot.kg_terms, LayeredKGTerms) else None
            terms = LayeredKGTerms.extended(self._base_terms, previous, index.entities[index.delta.n_base :])
        self._snapshot = make_snapshot(self.runtime, index, self._snapshot.source_warning, terms)

    @classmethod
    def for_serving(cls, settings: Settings) -> Linker:
        """`from_settings` with the change log open when live updates are on (EL_UPDATES__ENABLED)."""
        return cls.from_settings(settings, live=settings.updates.enabled)

    @classmethod
    def from_settings(cls, settings: Settings, *, live: bool = False) -> Linker:
        """Export the encoders if needed, load and verify the index, return a ready Linker."""
        from service.encoders import export_encoders

        runtime = export_encoders(settings)
        if settings.rerank.torch_threads:
            # Small Sinkhorn batches run fastest on one thread; more threads fight ONNX Runtime for cores.
            import torch

            torch.set_num_threads(settings.rerank.torch_threads)
        configure_coarse(settings.index.bf16_shortlist)
        configure_int8(settings.index.int8_shortlist)
        index, warning = load_checked_index(settings, runtime, settings.index.dir)
        return cls(settings, runtime, index, warning, live=live)

    @property
    def index(self) -> KGIndex:
        """The index served now (as of the last `sync`)."""
        return self._snapshot.index

    def sync(self) -> None:
        """Take in what other processes serving the folder logged, or the folder a compaction or rebuild swapped in
        (two stat calls when nothing changed; a swap loads the folder, about 1.5 s for 41k entities: call it off the
        event loop). Every link batch starts with it."""
        if self.store is not None:
            self.store.sync()

    @property
    def featurizer(self) -> Featurizer | StudentFeaturizer:
        """How mentions are encoded for the current index (benchmarks encode query sets with it)."""
        return self._snapshot.featurizer

    @property
    def source_warning(self) -> str | None:
        """Set while serving an index built from another KG on purpose (EL_INDEX__ALLOW_SOURCE_MISMATCH)."""
        return self._snapshot.source_warning

    def swap_index(self, folder: Path) -> KGIndex:
        """Load and verify folder, then switch to it atomically; the old index stays in use on failure."""
        with self._swap_lock:
            new, warning = load_checked_index(self.settings, self.runtime, folder)
            if self.store is not None and self.store.compacting:
                raise RuntimeError("a compaction is running; reload after it")
            base_terms = KGTerms(new.entities)
            store = (LiveStore(new, lock=self._swap_lock, encoder_signature=self.runtime.spec.signature(),
                               loader=self._load_folder) if self.store is not None else None)  # replays its log
            if self.store is not None:
                self.store.close()
            self.store, self._base_terms, self._base_terms_version = store, base_terms, new.manifest.version
            self._snapshot = make_snapshot(self.runtime, new, warning, base_terms)
            if store is not None:
                store._publish = self._publish
                self._publish(store.snapshot)
                new = store.snapshot
        logger.info("index swapped to %s", new.version)
        return new

    # ------------------------------------------------------------------ live entity changes

    def entity_runtime(self) -> EncoderRuntime:
        """The encoder the update worker uses: the same model files and runtime class as the serving one (and as
        the index build), in sessions of their own with EL_UPDATES__ENCODER_THREADS threads, so that encoding a
        batch of entities takes one core and /v1/link keeps the others (0: the serving sessions themselves, unless
        EL_UPDATES__INT8_ENCODER asks for the int8 entity encoder, which only sessions of their own load)."""
        threads, int8 = self.settings.updates.encoder_threads, self.settings.updates.int8_encoder
        if not threads and not int8:
            return self.runtime
        with self._entity_runtime_lock:  # the background warm-up and a first change may race: load it once
            if self._entity_runtime is None:
                enc = self.settings.encoder
                if int8:
                    from models.export import ensure_int8_entity_encoder

                    try:
                        int8 = ensure_int8_entity_encoder(enc.onnx_dir) is not None
                    except Exception:  # a read-only folder, a full disk, a quantiser error: changes still work
                        logger.warning("cannot make the int8 entity encoder in %s; entity changes are encoded in "
                                       "fp32", enc.onnx_dir, exc_info=True)
                        int8 = False
                runtime = EncoderRuntime(enc.onnx_dir, device=enc.device, threads=threads, int8_entities=int8)
                if runtime.spec.signature() != self.runtime.spec.signature():
                    raise RuntimeError("the encoder files changed under the running server; restart it")
                self._entity_runtime = runtime
        return self._entity_runtime

    def encode_entities(self, metas: list[EntityMeta], images: list) -> list[EntityRow]:
        """Encode entities exactly as the index build does (the same runtime and featurizer of the index's kind)."""
        index = self._snapshot.index
        runtime = self.entity_runtime()
        featurizer: Featurizer | StudentFeaturizer
        if index.heads:
            featurizer = StudentFeaturizer(runtime, "entity")
        else:
            assert index.projections is not None
            featurizer = Featurizer(runtime, index.projections)
        feats = featurizer([m.name for m in metas], [m.description for m in metas], images)
        return rows_from_features(metas, feats, index.manifest.max_tokens)

    def apply_changes(self, changes: list[Change]) -> KGIndex:
        """Log and apply entity changes; the returned snapshot (served from now on) includes them. Raises
        kg_index.live_store.UnknownEntity for a removal of an id the index does not hold (nothing applied)."""
        if self.store is None:
            raise RuntimeError("live updates are off for this linker")
        return self.store.apply(changes)

    def compact(self) -> KGIndex:
        """Fold the change log into a fresh index folder and serve it (RuntimeError when one is running)."""
        if self.store is None:
            raise RuntimeError("live updates are off for this linker")
        return self.store.compact(encoder_signature=self.runtime.spec.signature())

    def warm_up_updates(self) -> None:
        """Load and run the update worker's encoder once, so that the first entity change pays no load."""
        from PIL import Image

        if self.store is not None:
            self.encode_entities([EntityMeta("warm-up", "warm up", "", False)], [Image.new("RGB", (32, 32))])

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
        (`DeadlineExceeded`). A batch of EL_BATCHING__SPLIT_MIN or more mentions that finds no other running is
        linked as two halves at once, from the same snapshot (service/pipeline/halves.py).
        """
        self.sync()  # changes other server processes logged: seen by this batch
        snap = self._snapshot  # read once: the whole batch is answered from one index
        split = self.settings.batching.split_min
        with self._occupancy.enter() as alone:
            alone = alone and self.device.type == "cpu"
            if alone and split and len(queries) >= split:
                return in_halves(self._occupancy, queries, lambda part: self._link(snap, part, rerank, deadline),
                                 _merge)
            # Alone and small: the helper thread is idle, and a search of one or two queries may use it
            # (kg_index/exact.py spare_core; only where the index's plan measured that faster).
            return self._link(snap, queries, rerank, deadline, self._occupancy.helper() if alone and split else None)

    def _link(self, snap: Snapshot, queries: list[LinkQuery], rerank: bool | None, deadline: float | None,
              spare: Executor | None = None) -> BatchOutcome:
        cfg, s = self.rerank, self.settings
        do_rerank = s.rerank.enabled if rerank is None else rerank
        if not queries:
            return BatchOutcome([], [], {})
        timings: dict[str, float] = {}
        t0 = t = time.perf_counter()

        feats = encode_queries(snap.featurizer, queries, delay_ms=s.stage_delay_ms, deadline=deadline)
        timings["encode"], t = _lap(t)

        k = max(max(q.top_k for q in queries), s.rerank.candidates if do_rerank else 0)
        excluded = _rows_of(snap.index, self.excluded) if self.excluded else None
        with spare_core(spare):
            retrieval, rows = retrieve(snap.index, feats.global_, k, excluded)
        timings["retrieve"], t = _lap(t)

        stats: list[OTStats] = []
        skipped = np.zeros(len(queries), bool)
        want = np.asarray([q.explain for q in queries], bool)
        recorder = PlanRecorder(want) if do_rerank and want.any() else None  # explain=true only: no cost otherwise
        terms = {"retrieval_score": retrieval}
        final = retrieval.copy()
        if do_rerank:
            check_deadline(deadline)
            sub = dict.fromkeys(RERANK_STAGES, 0.0)
            values, stats, skipped = adaptive_terms(snap, queries, feats, rows, retrieval, cfg, self.device,
                                                    self.skip_margin, sub, recorder)
            terms.update(values)
            final = mix(cfg, retrieval, values)
            timings["rerank"], t = _lap(t)  # the total; its parts follow
            timings.update(sub)

        results = build_results(snap.index, queries, rows, terms, final,
                                verdict=self.verdict, model_version=self.model_version, excluded=self.excluded)
        if want.any():
            scorer = "student" if snap.cross is student_rerank else "zero-shot"
            found = explanations(snap.index, self.runtime, scorer, queries, rows, results,
                                 recorder or PlanRecorder(want))
            for i, aligned in found.items():
                results[i].explain = aligned
        timings["respond"], t = _lap(t)
        timings["total"] = (t - t0) * 1000
        for r in results:
            r.timings_ms = dict(timings)
        return BatchOutcome(results, stats, timings, int(skipped.sum()))

    def with_weights(self, **weights: float) -> Linker:
        """A shallow copy with other score weights (used by evaluation to report each system)."""
        other = copy.copy(self)
        other.rerank = replace(self.rerank, **weights)
        return other

    def with_skip_margin(self, margin: float | None) -> Linker:
        """A shallow copy with another adaptive-rerank margin (None: always OT; -inf: never; see adaptive_terms)."""
        other = copy.copy(self)
        other.skip_margin = margin
        return other

    def with_excluded(self, ids: frozenset[str] | set[str]) -> Linker:
        """A shallow copy that answers as if `ids` were not in the KB (evaluation only: the NIL protocol,
        service/offline/nil_protocol.py). Their rows are masked at search time, never rebuilt: the retrieve stage
        takes extra hits and drops them before the rerank, so what is left is exactly the KB without them."""
        other = copy.copy(self)
        other.excluded = frozenset(ids)
        return other


def _merge(first: BatchOutcome, second: BatchOutcome) -> BatchOutcome:
    """The outcome of a batch linked as two halves at once: results in order; each stage's time is the longer
    half's (they ran side by side); each result keeps its own half's timings."""
    timings = {k: max(first.timings_ms.get(k, 0.0), second.timings_ms.get(k, 0.0))
               for k in {**first.timings_ms, **second.timings_ms}}
    return BatchOutcome(first.results + second.results, first.ot_stats + second.ot_stats, timings,
                        first.ot_skipped + second.ot_skipped)


def load_verdict(settings: Settings, model_version: str) -> Verdict:
    """The confidence and NIL rule of the settings: the calibration JSON (shipped unless EL_CALIBRATION__PATH),
    with a warning when it was fitted for other encoders or heads (refit: `el fit-calibration`)."""
    from models.checkpoint import WEIGHTS_DIR

    c = settings.calibration
    path = c.path or WEIGHTS_DIR / "calibration.json"
    calibration = None
    if path.is_file():
        calibration = Calibration.load(path)
        if calibration.model_version != model_version:
            logger.warning("calibration %s was fitted for model %s, this is %s: confidence and nil may be off; "
                           "refit with `el fit-calibration`", path, calibration.model_version, model_version)
    else:
        logger.warning("no calibration at %s: confidence is null and nil falls back to EL_NIL_THRESHOLD", path)
    if c.nil_rule == "score_threshold":
        logger.warning("nil by EL_NIL_THRESHOLD (top score < %g) is deprecated: unset it to use the calibrated rule "
                       "(EL_CALIBRATION__NIL_RULE=calibrated)", settings.nil_threshold)
    prior = None
    if c.mention_prior and calibration is not None and set(PRIOR_FEATURES) & set(calibration.answerable.features):
        if (p := prior_path(path)).is_file():
            prior = MentionPrior.load(p)
        else:
            logger.warning("the NIL rule of %s reads a mention prior, and %s is missing: it is read as empty", path, p)
    return Verdict(calibration, c.nil_rule, c.nil_min_answerable, settings.nil_threshold, prior)


def _rows_of(index: KGIndex, ids: frozenset[str]) -> np.ndarray:
    return np.fromiter((r for e in ids if (r := index.row_of.get(e)) is not None), np.int64)


def _lap(t: float) -> tuple[float, float]:
    now = time.perf_counter()
    return (now - t) * 1000, now
