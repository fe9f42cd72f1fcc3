"""Exact inner-product search over a plain matrix (FAISS Flat): the baseline the benchmarks compare the served
index with. Here because only kg_index/ imports faiss."""

from __future__ import annotations

import faiss
import numpy as np


class FlatIP:
    """FAISS IndexFlatIP over unit rows [N, d] float32, FAISS's defaults as a user would have them: search returns
    (scores [B, k], rows [B, k])."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
