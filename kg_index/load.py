"""Load and verify an index folder; the only reader of what kg_index/build.py writes.

Everything is checked before the index can serve: the manifest, every file's size and checksum,
the encoder signature, dimensions and counts, and that the id map matches the metadata.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from kg_index.attributes import lifespan
from kg_index.delta import Delta
from kg_index.exact import ExactSearch
from kg_index.factory import HNSW_EF_CONSTRUCTION, ef_construction
from kg_index.manifest import IndexIntegrityError, Manifest, verify_files
from models.features import Projections

logger = logging.getLogger(__name__)


@dataclass
class EntityMeta:
    id: str
    name: str
    description: str
    has_image: bool
    start_year: int | None = None  # lifespan: the KG's own years, else read from the description
    end_year: int | None = None
    changed: bool = False  # put through the API since the KG file was read: the file's image (if any) is not its


@dataclass
class KGIndex:
    folder: Path
    manifest: Manifest
    faiss_index: faiss.Index
    ids: list[str]
    entities: list[EntityMeta]
    row_of: dict[str, int]
    projections: Projections | None  # zero-shot indexes only
    text_local: np.ndarray  # [N, T, d] fp16, memory-mapped
    text_seg: np.ndarray  # [N, T] uint8, memory-mapped
    image_rows: np.ndarray  # [N] int32
    image_local: np.ndarray  # [M, P, d] fp16
    unit_globals: np.ndarray | None = None  # student indexes: [N, 2, d] fp16
    image_blank: np.ndarray | None = None  # student indexes: [P, d] fp16, the missing image's patches
    exact: ExactSearch | None = None  # Flat (exact inner-product) indexes: searched by a matmul, not by FAISS
    # Live snapshots only (kg_index/live.py): rows appended and rows removed since the folder was loaded. The
    # array fields above then include the appended rows (Stacked views), and ids/entities the dead rows too.
    delta: Delta | None = None

    @property
    def n_image_rows(self) -> int:
        return int(self.image_local.shape[0])

    @property
    def heads(self) -> str:
        return self.manifest.heads

    @property
    def version(self) -> str:
        """The folder's version, then `+<n>` once n changes have been applied on top of it (live snapshots)."""
        if self.delta is None or not self.delta.applied:
            return self.manifest.version
        return f"{self.manifest.version}+{self.delta.applied}"

    def __len__(self) -> int:
        """Entities served (a live snapshot's rows less the removed and replaced ones)."""
        return len(self.ids) if self.delta is None else self.delta.n_live

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and inner-product scores for queries [B, D]; rows are -1 past the KB size.

        Flat indexes: an exact matmul + top-k over FAISS's stored vectors (kg_index/exact.py says why it is
        several times faster than FAISS's own search here); IVF/HNSW: FAISS."""
        k = max(1, min(k, len(self)))
        if self.delta is not None:
            return self.delta.search(self.exact, self.faiss_index, queries, k)
        if self.exact is not None:
            return self.exact.search(queries, k)
        scores, rows = self.faiss_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows


# Search-time knobs of the approximate index types; exact (Flat) indexes ignore them. Mention vectors lie far
# from the entity vectors (top-1 inner product ~0.34 of a possible 0.67), hard queries for a graph, and HNSW32's
# recall@32 falls as the KG grows (`el bench-scale`; synthetic neighbours of the real KG). Graphs built with FAISS's
# default efConstruction (40; indexes built before kg_index/factory.py) need wide searches: at 100k efSearch
# 128 -> 0.954, 256 -> 0.983; at 1M 256 -> 0.960, 512 -> 0.981. Each tier is the smallest efSearch measured to keep
# >= 0.98 (boundaries between measured sizes interpolated); small KGs keep 128 (FAISS's default of 16 loses about
# 4 % of the candidates). nprobe only matters for an IVF factory asked for by name: IVF4096,Flat at 1M needed
# nprobe 256 (1/16 of the lists) for 0.98 and was slower than HNSW at every recall.
SEARCH_TIERS: tuple[tuple[int, dict[str, int]], ...] = (  # (from this many entities, knobs), largest first
    (150_000, {"efSearch": 512, "nprobe": 256}),
    (20_000, {"efSearch": 256, "nprobe": 64}),
    (0, {"efSearch": 128, "nprobe": 32}),
)
# Graphs built with efConstruction >= HNSW_EF_CONSTRUCTION (200, what the build uses now) are good enough for
# narrow searches: efSearch 128 gave recall@32 0.983 at 100k and 0.988 at 1M (0.70 ms a query there, against 2.3 ms
# for 0.981 on the old graph; reports/bench-scale.json). Above the largest size measured, a wider search for margin.
GRAPH_TIERS: tuple[tuple[int, dict[str, int]], ...] = (
    (1_000_001, {"efSearch": 192}),
    (0, {"efSearch": 128}),
)


def search_params(n: int, ef_construction: int | None = None) -> dict[str, int]:
    """The knobs for an index of n vectors (an HNSW graph's own efConstruction, when known, picks its tiers)."""
    params = next(params for floor, params in SEARCH_TIERS if n >= floor)
    if ef_construction is not None and ef_construction >= HNSW_EF_CONSTRUCTION:
        params = {**params, **next(p for floor, p in GRAPH_TIERS if n >= floor)}
    return params


def configure_search(index: faiss.Index) -> None:
    params = faiss.ParameterSpace()
    for name, value in search_params(index.ntotal, ef_construction(index)).items():
        try:
            params.set_index_parameter(index, name, value)
        except RuntimeError:  # the index type has no such parameter
            pass


def _npy(folder: Path, name: str, shape: tuple, dtype: np.dtype, mmap: bool) -> np.ndarray:
    path = folder / name
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise IndexIntegrityError(f"{path}: unreadable ({exc.__class__.__name__})") from exc
    if arr.dtype != dtype or any(want is not None and got != want for got, want in zip(arr.shape, shape)) or arr.ndim != len(shape):
        raise IndexIntegrityError(f"{path}: shape {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}")
    return arr


def load_index(folder: Path, *, encoder_signature: str | None = None, verify_checksums: bool = True) -> KGIndex:
    """Load folder, refusing anything inconsistent with a message naming the file."""
    m = Manifest.read(folder)
    if verify_checksums:
        verify_files(m, folder)
    if encoder_signature is not None and m.encoder_signature != encoder_signature:
        raise IndexIntegrityError(
            f"{folder / 'manifest.json'}: built with encoders {m.encoder_signature}, the service runs {encoder_signature}; "
            "rebuild the index (make index)"
        )
    n, t, d = m.n_entities, m.max_tokens, m.local_dim
    try:
        index = faiss.read_index(str(folder / "faiss.index"))
    except RuntimeError as exc:
        raise IndexIntegrityError(f"{folder / 'faiss.index'}: unreadable FAISS index") from exc
    configure_search(index)
    if index.d != m.global_dim or index.ntotal != n:
        raise IndexIntegrityError(f"{folder / 'faiss.index'}: dim {index.d} x {index.ntotal}, manifest says {m.global_dim} x {n}")
    try:
        ids = json.loads((folder / "ids.json").read_text())
        rows = [json.loads(line) for line in (folder / "entities.jsonl").read_text().splitlines() if line]
        entities = [EntityMeta(r["id"], r["name"], r.get("description", ""), bool(r.get("has_image")),
                               *lifespan(r.get("start_year"), r.get("end_year"), r.get("description", "")),
                               changed=bool(r.get("changed")))
                    for r in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexIntegrityError(f"{folder / 'entities.jsonl'}: unreadable metadata ({exc.__class__.__name__})") from exc
    if len(ids) != n or len(set(ids)) != n:
        raise IndexIntegrityError(f"{folder / 'ids.json'}: {len(ids)} ids ({len(set(ids))} distinct), manifest says {n}")
    if [e.id for e in entities] != ids:
        raise IndexIntegrityError(f"{folder / 'entities.jsonl'}: rows do not match the id map in ids.json")
    proj = unit_globals = image_blank = None
    if m.heads:
        unit_globals = _npy(folder, "unit_globals.npy", (n, 2, d), np.float16, mmap=False)
        image_blank = _npy(folder, "image_blank.npy", (m.image_patches, d), np.float16, mmap=False)
        if m.global_dim != 4 * d:
            raise IndexIntegrityError(f"{folder / 'manifest.json'}: global dim {m.global_dim} is not 4 x local dim {d}")
    else:
        try:
            proj = Projections.load(folder / "projections.npz")
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise IndexIntegrityError(f"{folder / 'projections.npz'}: unreadable ({exc.__class__.__name__})") from exc
        if proj.global_dim != m.global_dim or proj.local_dim != d:
            raise IndexIntegrityError(f"{folder / 'projections.npz'}: dims {proj.global_dim}/{proj.local_dim} do not match the manifest")
    text_local = _npy(folder, "text_local.npy", (n, t, d), np.float16, mmap=True)
    text_seg = _npy(folder, "text_seg.npy", (n, t), np.uint8, mmap=True)
    image_rows = _npy(folder, "image_rows.npy", (n,), np.int32, mmap=False)
    image_local = _npy(folder, "image_local.npy", (m.n_images, m.image_patches, d), np.float16, mmap=True)
    if image_rows.max(initial=-1) >= m.n_images:
        raise IndexIntegrityError(f"{folder / 'image_rows.npy'}: points past image_local.npy")
    logger.info("loaded index %s from %s (%d entities)", m.version, folder, n)
    exact = ExactSearch.for_index(index)
    return KGIndex(folder, m, index, ids, entities, {e: i for i, e in enumerate(ids)}, proj,
                   text_local, text_seg, image_rows, image_local, unit_globals, image_blank, exact)
