"""Retrieve stage: exact top-k over the KG index's global vectors (a matmul for Flat indexes, FAISS for IVF/HNSW;
see KGIndex.search and kg_index/exact.py)."""

from __future__ import annotations

import numpy as np

from kg_index.load import KGIndex


def retrieve(index: KGIndex, global_vectors: np.ndarray, k: int,
             exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows [B, k'] with k' = min(k, KB size); FAISS pads missing hits with row -1.

    `exclude` (evaluation only: the NIL protocol, service/offline/nil_protocol.py): index rows that must never be
    returned. The search takes k + len(exclude) hits and drops those rows, so the answer is exactly the top-k of
    the KB without them (no rebuild), with k' = min(k, KB size - excluded)."""
    if exclude is None or not len(exclude):
        return index.search(global_vectors, k)
    k = max(1, min(k, len(index) - len(exclude)))
    scores, rows = index.search(global_vectors, k + len(exclude))
    dropped = np.isin(rows, exclude)
    order = np.argsort(dropped, axis=1, kind="stable")[:, :k]  # kept hits first, in score order
    scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    gone = np.take_along_axis(dropped, order, 1)  # only where fewer than k hits were kept (approximate indexes)
    return np.where(gone, np.finfo(scores.dtype).min, scores), np.where(gone, -1, rows)  # FAISS's padding
