"""Exact inner-product search for Flat indexes: one matrix product over the stored vectors, then a top-k.

Why not FAISS's own IndexFlatIP.search: with our batches (up to 64 queries of 384 dims against 40,942 vectors)
FAISS takes its non-BLAS path. It switches to BLAS only when nq * d >= `faiss.cvar.distance_compute_blas_threshold`
(128,000 since faiss 1.15, PR #5022; before that nq >= 20): 64 x 384 = 24,576 stays below it, so every query
streams the whole 63 MB database on its own (SIMD dot products per vector, one OpenMP thread per query, a heap
per query), about 64 passes over memory per batch instead of one blocked GEMM. Measured on this project's 2-core
CPU (batches of 64): 3.4 ms per query for FAISS against about 0.5 ms for the GEMM + top-k here. Lowering the
threshold makes FAISS use BLAS, but that is a process-wide global shared with every other index, and its BLAS
path still keeps a heap per query and spawns OpenMP threads for each block; a plain matmul + topk is simpler
and at least as fast. One or two queries are the exception (SMALL_BATCH): there FAISS's scan on one thread finds
the candidates, and the same tie rule orders them.

The scores are the same inner products up to float rounding (the GEMM sums in another order than FAISS's
SIMD loop, ~1e-7), so rows are the same except between candidates whose scores tie to that precision.
IVF and HNSW indexes are not touched: they are searched by FAISS (kg_index/load.py).

On CPUs with native bfloat16 dot products (AVX512_BF16 or AMX), batches of COARSE_MIN_BATCH or more take a
shortlist first: a bf16 copy of the vectors (half the bytes to stream) scores every row, the best kk + COARSE_EXTRA
are rescored in fp32, and the top kk of those are returned. It stays exact, not approximate: a row left out of the
shortlist has a bf16 score at most the shortlist's last one, and its true score is at most that plus a bound on
bf16 rounding (`_bf16_bound`); a query whose kk-th fp32 score does not clear that is searched again in fp32 alone
(measured on WikiMEL test, RichpediaMEL and WikiDiverse dev mentions against the 40,942-entity index: no query
needed it). In the pipeline the retrieve stage's cost per mention fell 1.1x for batches of 8 and 1.3-1.6x for 16 to
64 (one thread).

Which kernel wins depends on the CPU, and this project's machines differ (an AMD EPYC and an Intel Xeon, both with
AVX512_BF16): on the Xeon the bf16 shortlist lost to the fp32 GEMM from 16 queries on, and the GEMM's two layouts
swapped places. So an index of CALIBRATE_MIN_ROWS or more measures its own `SearchPlan` once (`calibrate`: both
fp32 layouts, then the shortlist against the fp32 search at 8, 16, 32 and 64 queries, over at most CALIBRATE_ROWS of
its rows; and for one query, FAISS's scan against two row halves at once on a spare thread and against the bf16
scan below; about a second, cached per size class for the process) rather than trusting the CPU's flags.
Every plan gives the same rows: only the speed differs.

One or two queries (a lone request: its latency) may take a shortlist the same way: FAISS's SIMD scan over a bf16
copy of the vectors (IndexScalarQuantizer QT_bf16: half the fp32 bytes) in two row halves, at once on a spare core
or one after the other; the best kk + COARSE_EXTRA of each half rescored in fp32; exact by the same bound, with the
same fp32 re-search where it does not clear. (FAISS's int8 "direct" scan is faster still, but from 64 dimensions
on its SIMD path rounds the query to integers too, so its error has no useful bound.) `el bench` records the plan
and its timings under `index.search_plan`.

Where FBGEMM's int8 products are exact in int32 (VNNI: kg_index/int8_scan.py), the plan also times an int8
shortlist (an int8 copy of the vectors, a quarter of the fp32 bytes; its best kk + INT8_EXTRA rescored in fp32,
exact by `Int8Scores.bound`) for one query alone and for batches from 8 on, and serves it for one or two queries
without a spare core and for the batch sizes up to the last at which it keeps winning (`SearchPlan.int8_batches`):
the small batches /v1/link forms under load, where streaming the vectors is most of the search.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch

from kg_index.int8_scan import Int8Scores, int8_usable

logger = logging.getLogger(__name__)

CoarseMode = Literal["auto", "on", "off"]
_coarse_mode: CoarseMode = "auto"
_int8_mode: CoarseMode = "auto"


def configure_coarse(mode: CoarseMode) -> None:
    """The bf16 shortlist policy of every ExactSearch of this process (EL_INDEX__BF16_SHORTLIST): 'auto' where the
    CPU has native bf16 dot products, 'on' always (slow on CPUs without them: for tests), 'off' never."""
    global _coarse_mode
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"bf16 shortlist mode must be auto, on or off, got {mode!r}")
    _coarse_mode = mode


def configure_int8(mode: CoarseMode) -> None:
    """The int8 shortlist policy of every ExactSearch of this process (EL_INDEX__INT8_SHORTLIST): 'auto' for the
    batch sizes at which the index's calibration measured it fastest, 'on' for every batch (tests), 'off' never.
    Either way only where FBGEMM's int8 products are exact in int32 on this CPU (`int8_scan.int8_usable`)."""
    global _int8_mode
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"int8 shortlist mode must be auto, on or off, got {mode!r}")
    _int8_mode = mode


def int8_enabled() -> bool:
    return _int8_mode != "off" and int8_usable()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (x86 flags avx512_bf16 or amx_bf16). Without them
    torch's bf16 GEMM is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def coarse_enabled() -> bool:
    return _coarse_mode == "on" or (_coarse_mode == "auto" and cpu_has_bf16())


def flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """The stored vectors [N, D] fp32 of an exact inner-product index (a view of FAISS's memory, no copy: keep
    the index alive), or None when the index is not IndexFlat with METRIC_INNER_PRODUCT."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    n, d = index.ntotal, index.d
    if n == 0:
        return np.zeros((0, d), np.float32)
    return faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)


TIE_MARGIN = 16  # extra candidates taken before ordering ties as FAISS does
TIE_TOL = 0.0  # only equal scores are ties (duplicate entities); near-ties keep the GEMM's order of scores
# Up to this many queries FAISS's own SIMD scan finds the candidates: a matrix product with one or two columns takes
# a gemv path in torch that streams the vectors at a third of FAISS's speed (40,942 x 384 here: 7.3 ms against
# 2.2 ms for one query; from 4 queries on the GEMM wins, 1.4 against 2.0 ms per query). FAISS scans on one OpenMP
# thread: with its default of one per core, one query took 24 ms instead of 2.6 on a busy machine.
SMALL_BATCH = 2
# The bf16 shortlist from this many queries on. Whole searches (k = 32), one thread, 40,942 x 384, with a 64 MB read
# between searches as the pipeline's other stages evict the caches, ms per batch fp32 / shortlist (medians of 6
# alternating rounds, `scripts/bench_retrieval_bf16.py`'s threshold part): 4 queries 4.8 / 5.9, 5: 6.3 / 6.3,
# 6: 7.7 / 6.8, 7: 9.3 / 7.3, 8: 8.4 / 7.7 (MKL's fp32 GEMM has a fast kernel for 8 columns), 10: 11.8 / 8.5,
# 16: 16.5 / 10.9. Batches of 6-9 are what /v1/link forms at concurrency 32.
COARSE_MIN_BATCH = 6
# Shortlist = kk + COARSE_EXTRA rows. With kk = 48 (32 candidates + TIE_MARGIN), 96 rows left 0.5-1.4 % of the
# mentions for the fp32 re-search, 128 none (WikiMEL test: 5,131 mentions; WikiDiverse dev: 1,656).
COARSE_EXTRA = 80
# The int8 shortlist's extra rows. Its bound is wider than bf16's (~0.019 against ~0.003 for these unit-norm
# vectors: the queries' rounding to 255 steps), so it takes more: with kk = 48, 128 rows left 59 % of 3,000 real
# mentions (WikiMEL test, WikiDiverse and RichpediaMEL dev) for the fp32 re-search, 256 none.
INT8_EXTRA = 208
_BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)
CALIBRATE_MIN_ROWS = 8192  # smaller indexes keep the default plan: every kernel takes well under a millisecond
CALIBRATE_ROWS = 65536  # rows timed by `calibrate` (the first ones): enough to stream past every cache
CALIBRATE_BATCHES = (8, 16, 32, 64)
LARGE_BATCH = 24  # from here on a batch takes the plan's large_layout
Layout = Literal["queries", "vectors"]
# How one or two queries are searched: FAISS's fp32 scan ("faiss"), the fp32 GEMV in two row halves at once on a
# spare core ("halves"), FAISS's bf16 scan with its two halves at once ("bf16_halves") or one after the other ("bf16":
# no spare core needed), or the int8 shortlist ("int8", kg_index/int8_scan.py; no spare core needed).
SmallKernel = Literal["faiss", "halves", "bf16_halves", "bf16", "int8"]


@dataclass(frozen=True)
class SearchPlan:
    """How ExactSearch scores a batch. `layout` (batches below LARGE_BATCH) and `large_layout`: the fp32 GEMM as
    queries @ vectors.T ("queries") or as (vectors @ queries.T).T made contiguous ("vectors"; top-k on the
    transposed view itself was 1.4x slower for 64 queries). `coarse_max_batch`: the largest batch answered through
    the bf16 shortlist (from COARSE_MIN_BATCH on; below COARSE_MIN_BATCH it never is), None for no limit."""

    layout: Layout = "queries"
    large_layout: Layout = "queries"
    coarse_max_batch: int | None = None
    small: SmallKernel = "faiss"  # 1-2 queries with a spare core (`spare_core`)
    small_alone: Literal["faiss", "bf16", "int8"] = "faiss"  # 1-2 queries without one
    int8_batches: tuple[int, int] = (0, -1)  # batches of lo..hi (> SMALL_BATCH) queries take the int8 shortlist
    measured: dict[str, float] | None = None  # the calibration's fastest rounds, ms per batch (logs, the bench)


_plans: dict[tuple[int, int, bool], SearchPlan] = {}
_spare: ContextVar[Executor | None] = ContextVar("exact_search_spare_core", default=None)
_calibrating: ContextVar[bool] = ContextVar("exact_search_calibrating", default=False)

Kernel = Literal["fp32", "faiss_scan", "halves", "bf16_scan", "bf16_shortlist", "int8_shortlist"]
KERNELS: tuple[Kernel, ...] = ("fp32", "faiss_scan", "halves", "bf16_scan", "bf16_shortlist", "int8_shortlist")


class SearchCounts:
    """Process-wide, thread-safe: queries answered per kernel by every ExactSearch of the process, and queries a
    shortlist's bound sent back to the fp32 search (expected: almost none); the `el_exact_search_*` metrics.
    The calibration's own searches are not counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queries = dict.fromkeys(KERNELS, 0)
        self._researched = 0

    def add(self, kernel: Kernel, queries: int) -> None:
        with self._lock:
            self._queries[kernel] += queries

    def add_researched(self, queries: int) -> None:
        if not _calibrating.get():
            with self._lock:
                self._researched += queries

    def snapshot(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return dict(self._queries), self._researched


SEARCH_COUNTS = SearchCounts()


@contextmanager
def spare_core(executor: Executor | None) -> Iterator[None]:
    """Within the block (this thread), a search of one or two queries may run half its scan on `executor`: an idle
    core's thread (the Linker's helper when a batch runs alone). FAISS's scan of one query runs on one thread
    whatever its OpenMP setting; where the plan measured them faster (`SearchPlan.small`), two row halves of the
    fp32 GEMV, or of the bf16 scan, run at once instead."""
    token = _spare.set(executor)
    try:
        yield
    finally:
        _spare.reset(token)


class ExactSearch:
    """Top-k inner products of queries [B, D] against vectors [N, D] (torch matmul + topk: MKL's GEMM)."""

    def __init__(self, vectors: np.ndarray, owner: object = None) -> None:
        """`owner`: whatever owns the memory of `vectors` (the FAISS index they are a view of), kept alive here."""
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise ValueError(f"vectors must be [N, D] float32, got {vectors.shape} {vectors.dtype}")
        self._owner = owner
        self.vectors = vectors
        self._t = torch.from_numpy(np.ascontiguousarray(vectors))  # shares memory with `vectors`
        # The bf16 copy (half the fp32 bytes): made here when the shortlist is on, so that the first large batch
        # after a load, a reload or a compaction does not pay for it; else on first use (the mode changed since).
        self._coarse: torch.Tensor | None = None
        if coarse_enabled() and len(vectors) > COARSE_EXTRA + TIE_MARGIN:
            self._coarse = self._t.to(torch.bfloat16)
        self._max_norm = float(np.linalg.norm(vectors, axis=1).max(initial=0.0))
        self._scan: list[tuple[int, faiss.Index]] | None = None  # (first row, FAISS bf16 scan) per row half
        self._int8: Int8Scores | None = None  # the int8 copy, where the plan or the mode uses it
        self.shortlisted = 0  # queries answered through the bf16 shortlist
        self.scan_shortlisted = 0  # queries (one or two at a time) answered through the bf16 scan
        self.int8_shortlisted = 0  # queries answered through the int8 shortlist
        self.fp32_researches = 0  # of those three, the ones a bound sent back to the fp32 search (expected: none)
        self.plan = plan_for(self)
        if self.plan.small.startswith("bf16") or self.plan.small_alone == "bf16":
            self._scan_halves()  # here, not in the first lone request after a load, reload or compaction
        if self._int8_possible() and (_int8_mode == "on" or self.plan.int8_batches[0] <= self.plan.int8_batches[1]
                                      or "int8" in (self.plan.small, self.plan.small_alone)):
            self._int8_kernel()

    @classmethod
    def for_index(cls, index: faiss.Index) -> ExactSearch | None:
        """Exact search over a Flat inner-product index's own vectors (no copy), or None for any other index."""
        vectors = flat_vectors(index)
        return cls(vectors, owner=index) if vectors is not None and len(vectors) else None

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def search(self, queries: np.ndarray, k: int, dead: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B, k] fp32 descending, rows [B, k] int64) for 1 <= k <= N, as FAISS returns them. Equal scores
        (duplicate entities, which a KG has) are ordered as FAISS's heap orders them within its top k, the larger
        row first, so that the same duplicate wins (measured: identical rows to FAISS on 600 RichpediaMEL dev
        mentions x 32 candidates, where an unordered top-k changed 2 top-1s); a tie group that the k-th place cuts
        keeps its largest rows, alone or in a batch (FAISS's own pick there depends on its scan). Scores that differ
        only by float rounding (~1e-7: the GEMM sums in another order than FAISS's SIMD loop) may swap places.

        `dead` [N] bool: rows never returned (removed entities of a live index); k must not exceed the live rows."""
        n = len(self)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        kk = min(n, k + TIE_MARGIN)
        spare = _spare.get()
        n_dead = 0 if dead is None else int(dead.sum())
        small = (self.plan.small if spare is not None else self.plan.small_alone) \
            if len(queries) <= SMALL_BATCH else None
        kernel: Kernel = "fp32"
        if self._int8_for(len(queries), small) and kk + INT8_EXTRA + n_dead < n:
            kernel = "int8_shortlist"
            top, rows = self._int8_shortlisted(queries, kk, dead)

            def full_row(i: int) -> np.ndarray:
                return self._fp32_scores(queries[i : i + 1], dead)[0].numpy()
        elif small in ("bf16", "bf16_halves") and self._scan_possible(kk + n_dead):
            kernel = "bf16_scan"
            top, rows = self._scan_shortlisted(queries, kk, dead, n_dead, spare if small == "bf16_halves" else None)

            def full_row(i: int) -> np.ndarray:
                return self._fp32_scores(queries[i : i + 1], dead)[0].numpy()
        elif small == "halves" and spare is not None:
            kernel = "halves"
            top, rows = self._in_row_halves(queries, kk, dead, spare)

            def full_row(i: int) -> np.ndarray:
                return self._fp32_scores(queries[i : i + 1], dead)[0].numpy()
        elif len(queries) <= SMALL_BATCH and isinstance(self._owner, faiss.Index):
            kernel = "faiss_scan"
            threads = faiss.omp_get_max_threads()  # OpenMP's setting is per calling thread: restored below
            faiss.omp_set_num_threads(1)
            try:  # with dead rows: as many more hits as there are dead rows, so kk live ones remain
                top, rows = self._owner.search(queries, min(n, kk + n_dead))
            finally:
                faiss.omp_set_num_threads(threads)
            if n_dead:
                dead_np = dead.numpy()
                keep = np.argsort(dead_np[rows], axis=1, kind="stable")[:, :kk]  # live hits first, in order
                top, rows = np.take_along_axis(top, keep, 1), np.take_along_axis(rows, keep, 1)
                top[dead_np[rows]] = -np.inf  # only when fewer than kk rows live: past k, cut below

            def full_row(i: int) -> np.ndarray:
                row = self.vectors @ queries[i]
                if n_dead:
                    row[dead_np] = -np.inf
                return row
        elif len(queries) >= COARSE_MIN_BATCH and kk + COARSE_EXTRA < n and self._coarse_for(len(queries)):
            kernel = "bf16_shortlist"
            top, rows = self._shortlisted(queries, kk, dead)

            def full_row(i: int) -> np.ndarray:
                return self._fp32_scores(queries[i : i + 1], dead)[0].numpy()
        else:
            scores = self._fp32_scores(queries, dead)
            with torch.no_grad():
                top_t, rows_t = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
            top, rows = top_t.numpy(), rows_t.numpy()

            def full_row(i: int) -> np.ndarray:
                return scores[i].numpy()
        SEARCH_COUNTS.add(kernel, len(queries))
        # Both paths end in one rule for ties, so a query gets the same rows alone or in a batch.
        top, rows = _faiss_order(top, rows)
        if kk < n:  # rare: a tie group reaching the kk-th score may go on past it; that row's whole group decides
            for i in np.flatnonzero(top[:, k - 1] - top[:, -1] <= TIE_TOL):
                row = full_row(i)
                # The k-th score of this row itself, not top[i, k - 1]: the row may come from another kernel (FAISS's
                # scan, the bf16 shortlist's rescoring) whose rounding differs in the last bit.
                kth = np.partition(row, len(row) - k)[len(row) - k]
                cand = np.flatnonzero(row >= kth - TIE_TOL)
                cand = cand[np.argsort(-row[cand], kind="stable")]
                top_i, rows_i = _faiss_order(row[cand][None], cand[None])
                top[i, :k], rows[i, :k] = top_i[0, :k], rows_i[0, :k]
        return top[:, :k], rows[:, :k]

    def _int8_possible(self) -> bool:
        return int8_enabled() and len(self) > INT8_EXTRA + TIE_MARGIN

    def _int8_for(self, batch: int, small: SmallKernel | None) -> bool:
        """Whether a batch of this size takes the int8 shortlist: in the plan's int8_batches, or one or two queries
        whose kernel (`small`, with or without a spare core) is int8; every batch in mode 'on'."""
        if not self._int8_possible():
            return False
        lo, hi = self.plan.int8_batches
        return _int8_mode == "on" or small == "int8" or lo <= batch <= hi

    def _int8_kernel(self) -> Int8Scores:
        if self._int8 is None:
            self._int8 = Int8Scores(self._t)
        return self._int8

    def _int8_shortlisted(self, queries: np.ndarray, kk: int, dead: torch.Tensor | None,
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Top kk (scores, rows), sorted, through the int8 shortlist: FBGEMM's int8 scores of every row, the best
        kk + INT8_EXTRA rescored in fp32; exact by `Int8Scores.bound` plus the rescoring's own rounding, with the
        same fp32 re-search as the bf16 shortlist where that does not clear."""
        kernel = self._int8_kernel()
        q = torch.from_numpy(queries)
        with torch.no_grad():
            last, idx = kernel.top(q, kk + INT8_EXTRA, dead)
            lowest = last.min(dim=1).values.double()  # a row outside the shortlist has an int8 score <= this
        rescoring = q.shape[1] * 2.0**-24 * q.norm(dim=1).double() * self._max_norm
        self.int8_shortlisted += len(queries)
        return self._rescored(queries, idx, kk, dead, lowest, kernel.bound(q) + rescoring, "int8 shortlist")

    def _coarse_for(self, batch: int) -> bool:
        """Whether a batch of this size (COARSE_MIN_BATCH or more) takes the bf16 shortlist."""
        if _coarse_mode == "on":
            return True
        limit = self.plan.coarse_max_batch
        return coarse_enabled() and (limit is None or batch <= limit)

    def _fp32_scores(self, queries: np.ndarray, dead: torch.Tensor | None, layout: Layout | None = None,
                     ) -> torch.Tensor:
        """[B, N] fp32 inner products (contiguous), dead rows -inf."""
        with torch.no_grad():
            # The same products either way; which layout MKL's GEMM runs faster depends on the CPU (`SearchPlan`).
            q = torch.from_numpy(queries)
            if layout is None:
                layout = self.plan.large_layout if len(queries) >= LARGE_BATCH else self.plan.layout
            if layout == "queries":
                scores = q @ self._t.T
            else:
                scores = (self._t @ q.T).T.contiguous()
            if dead is not None:
                scores.masked_fill_(dead, float("-inf"))
        return scores

    def _in_row_halves(self, queries: np.ndarray, kk: int, dead: torch.Tensor | None,
                       spare: Executor) -> tuple[np.ndarray, np.ndarray]:
        """Top kk (scores, rows), sorted: the fp32 scores of each half of the rows, one half on `spare`."""
        n = len(self)
        half = n // 2
        q = torch.from_numpy(queries)

        def part(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                scores = q @ self._t[lo:hi].T
                if dead is not None:
                    scores.masked_fill_(dead[lo:hi], float("-inf"))
                top, rows = torch.topk(scores, min(kk, hi - lo), dim=1, sorted=False)
            return top, rows + lo

        later = spare.submit(part, half, n)
        try:
            first = part(0, half)
        except BaseException:
            wait([later])
            raise
        second = later.result()
        with torch.no_grad():
            both, rows = torch.cat([first[0], second[0]], 1), torch.cat([first[1], second[1]], 1)
            top, order = torch.topk(both, kk, dim=1, sorted=True)
            return top.numpy(), torch.gather(rows, 1, order).numpy()

    def _scan_possible(self, wanted: int) -> bool:
        """Whether the bf16 scan's shortlist can serve `wanted` rows: each row half holds more than it takes."""
        return wanted + COARSE_EXTRA < len(self) // 2

    def _scan_halves(self) -> list[tuple[int, faiss.Index]]:
        """FAISS bf16 scalar-quantizer scans over each half of the rows (half the fp32 bytes; made on first use)."""
        if self._scan is None:
            n, d = self.vectors.shape
            parts = []
            for lo, hi in ((0, n // 2), (n // 2, n)):
                sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_bf16, faiss.METRIC_INNER_PRODUCT)
                sq.add(self.vectors[lo:hi])  # bf16 needs no training
                parts.append((lo, sq))
            self._scan = parts
        return self._scan

    def _scan_shortlisted(self, queries: np.ndarray, kk: int, dead: torch.Tensor | None, n_dead: int,
                          spare: Executor | None) -> tuple[np.ndarray, np.ndarray]:
        """Top kk (scores, rows), sorted, for one or two queries through the bf16 scan: FAISS's SIMD scan over a
        bf16 copy of each row half (one on `spare` when given, else one after the other) takes the best
        kk + COARSE_EXTRA (+ the dead rows) of each, those are rescored in fp32 and the top kk kept. Exact as the
        bf16 shortlist of larger batches is (`_bf16_bound`, plus the rescoring's own rounding); a query whose kk-th
        fp32 score does not clear the bound is searched again in fp32."""
        m = kk + COARSE_EXTRA + n_dead
        parts = self._scan_halves()

        def scan(part: tuple[int, faiss.Index]) -> tuple[np.ndarray, np.ndarray]:
            lo, sq = part
            # One OpenMP thread, on whichever thread scans (the setting is per calling thread): a query's scan runs
            # on one anyway, and a team's idle thread would spin on the core the other half needs.
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                d_, i_ = sq.search(queries, m)
            finally:
                faiss.omp_set_num_threads(threads)
            return d_, i_ + lo

        later = spare.submit(scan, parts[1]) if spare is not None else None
        try:
            first = scan(parts[0])
        except BaseException:
            if later is not None:
                wait([later])
            raise
        second = later.result() if later is not None else scan(parts[1])
        q = torch.from_numpy(queries)
        idx = torch.from_numpy(np.concatenate([first[1], second[1]], 1))  # [B, 2m]
        # A row left out by a half scores at most that half's last bf16 score: the larger of the two bounds it.
        lowest = torch.from_numpy(np.maximum(first[0][:, -1], second[0][:, -1])).double()
        rescoring = q.shape[1] * 2.0**-24 * q.norm(dim=1).double() * self._max_norm
        self.scan_shortlisted += len(queries)
        return self._rescored(queries, idx, kk, dead, lowest, self._bf16_bound(q) + rescoring, "bf16 scan")

    def _rescored(self, queries: np.ndarray, idx: torch.Tensor, kk: int, dead: torch.Tensor | None,
                  lowest: torch.Tensor, slack: torch.Tensor, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Top kk (scores, rows), sorted, of each query's shortlisted rows idx [B, S] rescored in fp32. A row left
        out scores at most lowest + slack [B] (its coarse score at most the shortlist's lowest, plus the bound on
        the coarse rounding): where that could reach the kk-th score, the query is searched again in fp32."""
        q = torch.from_numpy(queries)
        with torch.no_grad():
            # index_select: 2.4x faster than advanced indexing for this gather of scattered rows (*exploratory*)
            rows_fp32 = self._t.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)
            exact = torch.bmm(rows_fp32, q.unsqueeze(2)).squeeze(2)  # [B, S] fp32
            if dead is not None:
                exact.masked_fill_(dead[idx], float("-inf"))
            top, o = torch.topk(exact, kk, dim=1, largest=True, sorted=True)
            rows = torch.gather(idx, 1, o)
            unsafe = torch.isfinite(lowest) & (lowest + slack >= top[:, -1].double())
        top_np, rows_np = top.numpy(), rows.numpy()
        if bool(unsafe.any()):
            again = np.flatnonzero(unsafe.numpy())
            self.fp32_researches += len(again)
            SEARCH_COUNTS.add_researched(len(again))
            logger.debug("%s: %d of %d queries searched again in fp32", what, len(again), len(queries))
            with torch.no_grad():
                t, r = torch.topk(self._fp32_scores(queries[again], dead), kk, dim=1, largest=True, sorted=True)
            top_np[again], rows_np[again] = t.numpy(), r.numpy()
        return top_np, rows_np

    def _bf16_bound(self, q: torch.Tensor) -> torch.Tensor:
        """[B] an upper bound on |bf16 score - fp32 score| for any row: both factors rounded to bf16 (relative
        error u each), products summed in fp32 (d terms), the sum rounded to bf16 once more; every |q . v| is at
        most |q| max|v| (Cauchy-Schwarz)."""
        u, d = _BF16_U, q.shape[1]
        scale = q.norm(dim=1).double() * self._max_norm
        inner = scale * (2 * u + u * u + d * 2.0**-24 * (1 + 2 * u))
        return (inner + u * (scale + inner)) * 1.001 + 1e-12  # and a hair for the fp32 rescoring's own rounding

    def _shortlisted(self, queries: np.ndarray, kk: int, dead: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        """Top kk (scores, rows), sorted, through the bf16 shortlist; exact by `_bf16_bound` (see the module)."""
        if self._coarse is None:
            self._coarse = self._t.to(torch.bfloat16)
        q = torch.from_numpy(queries)
        with torch.no_grad():
            coarse = q.to(torch.bfloat16) @ self._coarse.T  # [B, N] bf16 (this layout: 1.3x faster for 8 queries)
            if dead is not None:
                coarse.masked_fill_(dead, float("-inf"))
            last, idx = torch.topk(coarse, kk + COARSE_EXTRA, dim=1, sorted=False)
            lowest = last.min(dim=1).values.double()  # a row outside the shortlist has a bf16 score <= this
        self.shortlisted += len(queries)
        return self._rescored(queries, idx, kk, dead, lowest, self._bf16_bound(q), "bf16 shortlist")


def plan_for(search: ExactSearch) -> SearchPlan:
    """The plan of an index of this size: measured once per size class and process (`calibrate`) where the
    shortlist modes are 'auto' (or one 'auto', the other 'off') and the index has CALIBRATE_MIN_ROWS rows or
    more; else the default (a mode forced 'on' serves every batch its way)."""
    n, d = search.vectors.shape
    modes = (_coarse_mode, _int8_mode)
    if "on" in modes or "auto" not in modes or n < CALIBRATE_MIN_ROWS:
        return SearchPlan()
    key = (n.bit_length(), d, coarse_enabled(), int8_enabled())
    if key not in _plans:
        _plans[key] = calibrate(search)
    return _plans[key]


def calibrate(search: ExactSearch, rounds: int = 3) -> SearchPlan:
    """Time the kernels on this CPU over (at most CALIBRATE_ROWS of) the index's own vectors, one thread as served:
    the faster fp32 layout for 8 and for 64 queries, then the shortlist against the fp32 search at each of
    CALIBRATE_BATCHES, in alternating rounds with a cache-sized read between (the pipeline's other stages evict the
    caches); the fastest round of each (noise only ever adds time). Then one query: FAISS's scan against the GEMV
    in two row halves at once (a spare thread), over the whole index (up to 4 x CALIBRATE_ROWS rows)."""
    rows = min(len(search), CALIBRATE_ROWS)
    sub = ExactSearch.__new__(ExactSearch)  # the same kernels over a view of the first rows, without a plan
    sub.__dict__.update(search.__dict__)
    sub.vectors, sub._t = search.vectors[:rows], search._t[:rows]
    sub._coarse = search._coarse[:rows] if search._coarse is not None else None
    sub.plan = SearchPlan()
    rng = np.random.default_rng(0)
    picks = search.vectors[rng.choice(len(search), max(CALIBRATE_BATCHES))]
    queries = np.ascontiguousarray(picks + rng.normal(0, 0.01, picks.shape).astype(np.float32))
    kk = 48  # 32 candidates + TIE_MARGIN, as the retrieve stage asks
    flush = np.ones(8 << 20, np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    calibrating = _calibrating.set(True)

    def timed(fn, batch: int) -> float:
        flush.sum()
        t = time.perf_counter()
        fn(queries[:batch])
        return (time.perf_counter() - t) * 1000

    def fp32(layout: Layout):
        return lambda q: torch.topk(sub._fp32_scores(q, None, layout), kk, dim=1)

    times: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            for _ in range(rounds):
                for layout in ("queries", "vectors"):
                    for b in (8, 64):
                        times.setdefault(f"{layout}@{b}", []).append(timed(fp32(layout), b))
            best = {k: min(v) for k, v in times.items()}
            small: Layout = "queries" if best["queries@8"] <= best["vectors@8"] else "vectors"
            large: Layout = "queries" if best["queries@64"] <= best["vectors@64"] else "vectors"
            limit: int | None = COARSE_MIN_BATCH - 1  # no batch
            shortlists = {}
            if coarse_enabled() and sub._coarse is not None:
                shortlists["bf16"] = lambda q: sub._shortlisted(q, kk, None)
            with_int8 = int8_enabled() and rows > INT8_EXTRA + TIE_MARGIN
            if with_int8:
                sub._int8 = search._int8_kernel() if rows == len(search) else Int8Scores(sub._t)
                shortlists["int8"] = lambda q: sub._int8_shortlisted(q, kk, None)
            if shortlists:
                sub.plan = SearchPlan(small, large)
                for _ in range(rounds):
                    for b in CALIBRATE_BATCHES:
                        times.setdefault(f"fp32@{b}", []).append(timed(lambda q: torch.topk(
                            sub._fp32_scores(q, None), kk, dim=1), b))
                        for name, fn in shortlists.items():
                            times.setdefault(f"{name}@{b}", []).append(timed(fn, b))
                best = {k: min(v) for k, v in times.items()}
            if "bf16" in shortlists:
                for b in CALIBRATE_BATCHES:  # the shortlist up to the last size at which it keeps winning
                    if best[f"bf16@{b}"] >= best[f"fp32@{b}"]:
                        break
                    limit = b
                else:
                    limit = None
            small_kernel: SmallKernel = "faiss"
            alone: Literal["faiss", "bf16", "int8"] = "faiss"
            if isinstance(search._owner, faiss.Index) and len(search) <= 4 * CALIBRATE_ROWS:
                omp = faiss.omp_get_max_threads()
                faiss.omp_set_num_threads(1)  # as served (SMALL_BATCH)
                with_scan = search._scan_possible(kk)
                if with_scan:
                    search._scan_halves()  # made before the timing
                try:
                    with ThreadPoolExecutor(1) as spare:
                        for _ in range(2 * rounds):
                            times.setdefault("faiss@1", []).append(timed(lambda q: search._owner.search(q, kk), 1))
                            times.setdefault("halves@1", []).append(
                                timed(lambda q: search._in_row_halves(q, kk, None, spare), 1))
                            if with_scan:
                                times.setdefault("bf16_halves@1", []).append(
                                    timed(lambda q: search._scan_shortlisted(q, kk, None, 0, spare), 1))
                                times.setdefault("bf16_alone@1", []).append(
                                    timed(lambda q: search._scan_shortlisted(q, kk, None, 0, None), 1))
                            if with_int8:
                                times.setdefault("int8@1", []).append(
                                    timed(lambda q: search._int8_shortlisted(q, kk, None), 1))
                finally:
                    faiss.omp_set_num_threads(omp)
                    # the calibration's own are not counted
                    search.scan_shortlisted = search.int8_shortlisted = search.fp32_researches = 0
                best = {k: min(v) for k, v in times.items()}
                spare_kernels: dict[SmallKernel, str] = {"faiss": "faiss@1", "halves": "halves@1"}
                alone_kernels: dict[Literal["faiss", "bf16", "int8"], str] = {"faiss": "faiss@1"}
                if with_scan:
                    spare_kernels.update({"bf16_halves": "bf16_halves@1", "bf16": "bf16_alone@1"})
                    alone_kernels["bf16"] = "bf16_alone@1"
                if with_int8:
                    spare_kernels["int8"] = alone_kernels["int8"] = "int8@1"
                small_kernel = min(spare_kernels, key=lambda kern: best[spare_kernels[kern]])
                alone = min(alone_kernels, key=lambda kern: best[alone_kernels[kern]])
                if not small_kernel.startswith("bf16") and alone != "bf16":
                    search._scan = None  # not served: its memory back
            best = {k: min(v) for k, v in times.items()}
            int8_batches = _int8_batches(best, limit) if with_int8 else (0, -1)
            if int8_batches[0] > int8_batches[1] and "int8" not in (small_kernel, alone) and _int8_mode != "on":
                search._int8 = None  # not served: its memory back
    finally:
        torch.set_num_threads(threads)
        _calibrating.reset(calibrating)
    plan = SearchPlan(small, large, limit, small_kernel, alone, int8_batches,
                      {k: round(v, 2) for k, v in best.items()})
    logger.info("exact search plan for %d x %d: fp32 layouts %s / %s, bf16 shortlist %s, one query with a spare "
                "core: %s, alone: %s (ms per batch: %s)", len(search), search.vectors.shape[1], plan.layout,
                plan.large_layout,
                "off" if limit is not None and limit < COARSE_MIN_BATCH else
                f"for {COARSE_MIN_BATCH}-{limit} queries" if limit else f"from {COARSE_MIN_BATCH} queries",
                plan.small, plan.small_alone, plan.measured)
    if int8_batches[0] <= int8_batches[1]:
        logger.info("exact search plan for %d x %d: the int8 shortlist first for %d-%d queries", len(search),
                    search.vectors.shape[1], *int8_batches)
    return plan


def _int8_batches(best: dict[str, float], bf16_limit: int | None) -> tuple[int, int]:
    """The batch sizes lo..hi (more than SMALL_BATCH queries) at which the int8 shortlist measured fastest: from the
    first of CALIBRATE_BATCHES up to the last size at which it keeps winning against the fp32 search or the bf16
    shortlist, whichever that size would take. (0, -1) for none."""
    def wins(b: int) -> bool:
        if f"int8@{b}" not in best:
            return False
        others = [v for k, v in best.items() if k.endswith(f"@{b}") and not k.startswith("int8")
                  and not (k.startswith("bf16@") and bf16_limit is not None and b > bf16_limit)
                  and k not in (f"queries@{b}", f"vectors@{b}")]
        return bool(others) and best[f"int8@{b}"] < min(others)

    lo, hi = 0, -1
    for b in CALIBRATE_BATCHES:
        if not wins(b):
            break
        lo, hi = SMALL_BATCH + 1, b
    return lo, hi


def _faiss_order(top: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [B, K] sorted by descending score (top [B, K]) -> FAISS's order: within each run of scores tied to
    TIE_TOL, the larger row first."""
    group = np.concatenate([np.zeros((len(top), 1), np.int64),
                            np.cumsum(np.diff(top, axis=1) < -TIE_TOL, axis=1)], axis=1)
    order = np.lexsort((-rows, group), axis=-1)
    return np.take_along_axis(top, order, -1), np.take_along_axis(rows, order, -1)
