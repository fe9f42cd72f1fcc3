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
"""

from __future__ import annotations

import faiss
import numpy as np
import torch


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


class ExactSearch:
    """Top-k inner products of queries [B, D] against vectors [N, D] (torch matmul + topk: MKL's GEMM)."""

    def __init__(self, vectors: np.ndarray, owner: object = None) -> None:
        """`owner`: whatever owns the memory of `vectors` (the FAISS index they are a view of), kept alive here."""
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise ValueError(f"vectors must be [N, D] float32, got {vectors.shape} {vectors.dtype}")
        self._owner = owner
        self.vectors = vectors
        self._t = torch.from_numpy(np.ascontiguousarray(vectors))  # shares memory with `vectors`

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
        if len(queries) <= SMALL_BATCH and isinstance(self._owner, faiss.Index):
            n_dead = 0 if dead is None else int(dead.sum())
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
        else:
            with torch.no_grad():
                # vectors @ queries.T rather than queries @ vectors.T: the same products, and MKL's GEMM runs this
                # layout 1.2-3.6x faster for batches of 64 down to 4 (measured on the 40,942 x 384 index).
                scores = (self._t @ torch.from_numpy(queries).T).T  # [B, N]
                if dead is not None:
                    scores.masked_fill_(dead, float("-inf"))
                top, rows = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
            top, rows = top.numpy(), rows.numpy()

            def full_row(i: int) -> np.ndarray:
                return scores[i].numpy()
        # Both paths end in one rule for ties, so a query gets the same rows alone or in a batch.
        top, rows = _faiss_order(top, rows)
        if kk < n:  # rare: a tie group reaching the kk-th score may go on past it; that row's whole group decides
            for i in np.flatnonzero(top[:, k - 1] - top[:, -1] <= TIE_TOL):
                row = full_row(i)
                cand = np.flatnonzero(row >= top[i, k - 1] - TIE_TOL)
                cand = cand[np.argsort(-row[cand], kind="stable")]
                top_i, rows_i = _faiss_order(row[cand][None], cand[None])
                top[i, :k], rows[i, :k] = top_i[0, :k], rows_i[0, :k]
        return top[:, :k], rows[:, :k]


def _faiss_order(top: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [B, K] sorted by descending score (top [B, K]) -> FAISS's order: within each run of scores tied to
    TIE_TOL, the larger row first."""
    group = np.concatenate([np.zeros((len(top), 1), np.int64),
                            np.cumsum(np.diff(top, axis=1) < -TIE_TOL, axis=1)], axis=1)
    order = np.lexsort((-rows, group), axis=-1)
    return np.take_along_axis(top, order, -1), np.take_along_axis(rows, order, -1)
