"""Retrieve stage: FAISS top-k over the KG index's global vectors."""

from __future__ import annotations

import numpy as np

from kg_index.load import KGIndex


def retrieve(index: KGIndex, global_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows [B, k'] with k' = min(k, KB size); FAISS pads missing hits with row -1."""
    return index.search(global_vectors, k)
