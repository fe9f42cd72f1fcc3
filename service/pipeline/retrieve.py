"""Retrieve stage: exact top-k over the KG index's global vectors (a matmul for Flat indexes, FAISS for IVF/HNSW;
see KGIndex.search and kg_index/exact.py)."""

from __future__ import annotations

import numpy as np

from kg_index.load import KGIndex


def retrieve(index: KGIndex, global_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows [B, k'] with k' = min(k, KB size); FAISS pads missing hits with row -1."""
    return index.search(global_vectors, k)
