"""The changed part of a live index snapshot (kg_index/live.py): appended global vectors, dead rows, and the search
over both the base index and the appended rows."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

from kg_index.exact import ExactSearch


@dataclass(frozen=True)
class Delta:
    """The changed part of one snapshot: appended global vectors and which rows (base and appended) are dead."""

    n_base: int
    vectors: torch.Tensor  # [A, D] fp32, the appended rows' global vectors
    dead: np.ndarray  # [N + A] bool
    dead_base_t: torch.Tensor | None  # [N] bool (None: no base row is dead)
    base_selector_bits: np.ndarray | None  # packed bits of the live base rows (FAISS IDSelectorBitmap), or None
    applied: int  # changes applied on top of the base

    @property
    def n_live(self) -> int:
        return int(len(self.dead) - self.dead.sum())

    def search(self, exact: ExactSearch | None, faiss_index: faiss.Index, queries: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the live rows: the base (`exact` or `faiss_index`, dead rows masked) and the appended rows
        (exact), merged; rows -1 and scores -inf past the live count."""
        return _search(self, exact, faiss_index, queries, k)


def _search(d: Delta, exact: ExactSearch | None, faiss_index: faiss.Index, queries: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    q = np.ascontiguousarray(queries, dtype=np.float32)
    b = len(q)
    dead_base = d.dead[: d.n_base]
    live_base = d.n_base - int(dead_base.sum())
    parts_s, parts_r = [], []
    kb = min(k, live_base)
    if kb > 0:
        if exact is not None:
            s, r = exact.search(q, kb, dead=d.dead_base_t)
        elif d.base_selector_bits is not None:
            s, r = faiss_index.search(q, kb, params=_filtered_params(faiss_index, d.base_selector_bits))
        else:
            s, r = faiss_index.search(q, kb)
        parts_s.append(s)
        parts_r.append(r)
    tail_dead = d.dead[d.n_base :]
    live_tail = len(tail_dead) - int(tail_dead.sum())
    if live_tail > 0:
        with torch.no_grad():
            s = torch.from_numpy(q) @ d.vectors.T  # [B, A]
            if tail_dead.any():
                s.masked_fill_(torch.from_numpy(tail_dead), float("-inf"))
            top, rows = torch.topk(s, min(k, live_tail), dim=1)
        parts_s.append(top.numpy())
        parts_r.append(rows.numpy().astype(np.int64) + d.n_base)
    if not parts_s:
        return np.full((b, k), -np.inf, np.float32), np.full((b, k), -1, np.int64)
    scores = np.concatenate(parts_s, axis=1).astype(np.float32)
    rows = np.concatenate(parts_r, axis=1).astype(np.int64)
    scores = np.where(rows >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return scores, np.where(np.isfinite(scores), rows, -1)


def _filtered_params(index: faiss.Index, bits: np.ndarray) -> faiss.SearchParameters:
    """Search parameters that skip the dead base rows, of the index's own type so that its configured efSearch /
    nprobe still hold (an IVF index refuses other parameter types; an HNSW one would fall back to its default)."""
    sel = faiss.IDSelectorBitmap(len(bits) * 8, faiss.swig_ptr(bits))
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=inner.hnsw.efSearch)
    elif isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=sel, nprobe=inner.nprobe)
    else:
        params = faiss.SearchParameters(sel=sel)
    params._keep = (sel, bits)  # the selector points into bits: both live as long as the parameters
    return params
