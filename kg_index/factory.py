"""Making an empty FAISS index from its factory string, with the build-time knobs a factory string cannot carry."""

from __future__ import annotations

import faiss

# HNSW graph quality (candidates kept while inserting; FAISS's default is 40). At 100k synthetic-plus-real vectors
# and real mention queries (`el bench-scale`), recall@32 at efSearch 128 went 0.954 (40) -> 0.975 (100) -> 0.983
# (200), the build taking 2x longer from 100 to 200: a better graph lets every search visit fewer nodes.
HNSW_EF_CONSTRUCTION = 200


def new_faiss_index(dim: int, factory: str) -> faiss.Index:
    """`faiss.index_factory` for inner product, with efConstruction set on an HNSW graph at the top."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


def ef_construction(index: faiss.Index) -> int | None:
    """The efConstruction an HNSW index was built with (FAISS stores it in the file), or None for other types."""
    inner = faiss.downcast_index(index)
    return int(inner.hnsw.efConstruction) if isinstance(inner, faiss.IndexHNSW) else None
