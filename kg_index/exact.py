"""Exact inner-product search for Flat indexes: one matrix product over the stored vectors, then a top-k.

Why not FAISS's own IndexFlatIP.search: with our batches (up to 64 queries of 384 dims against 40,942 vectors)
FAISS takes its non-BLAS path. It switches to BLAS only when nq * d >= `faiss.cvar.distance_compute_blas_threshold`
(128,000 since faiss 1.15, PR #5022; before that nq >= 20): 64 x 384 = 24,576 stays below it, so every query
streams the whole 63 MB database on its own (SIMD dot products per vector, one OpenMP thread per query, a heap
per query), about 64 passes over memory per batch instead of one blocked GEMM. Measured on this project's 2-core
CPU (batches of 64): 3.4 ms per query for FAISS against about 0.5 ms for the GEMM + top-k here. Lowering the
threshold makes FAISS use BLAS, but that is a process-wide global shared with every other index, and its BLAS
path still keeps a heap per query and spawns OpenMP threads for each block; a plain matmul + topk is simpler
and at least as fast.

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
        mentions x 32 candidates, where an unordered top-k changed 2 top-1s). Scores that differ only by float
        rounding (~1e-7: the GEMM sums in another order than FAISS's SIMD loop) may swap places.

        `dead` [N] bool: rows never returned (removed entities of a live index); k must not exceed the live rows."""
        n = len(self)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        kk = min(n, k + TIE_MARGIN)
        with torch.no_grad():
            scores = q @ self._t.T  # [B, N]
            if dead is not None:
                scores.masked_fill_(dead, float("-inf"))
            top, rows = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
        top, rows = _faiss_order(top.numpy(), rows.numpy())
        if kk < n:  # rare: a tie group reaching the kk-th score may go on past it; that row's whole group decides
            for i in np.flatnonzero(top[:, k - 1] - top[:, -1] <= TIE_TOL):
                row = scores[i].numpy()
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
