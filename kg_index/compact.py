"""Compaction: fold a live index (base folder + change log) into a fresh versioned folder, and swap it in.

`write_compacted` writes the live rows of a snapshot as a complete index folder, the same files, manifest and
checksums as kg_index/build.py (nothing is re-encoded: the stored features are copied), in the index's own type:
Flat and HNSW are rebuilt from the live vectors (HNSW cannot delete), IVF keeps its trained coarse quantizer and
gets the live vectors added again (no k-means). The caller verifies it with load_index before it is served.
`exchange_dirs` swaps two folders atomically (renameat2 RENAME_EXCHANGE), so the configured folder always
holds a whole index, the old or the new.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

from kg_index.factory import new_faiss_index
from kg_index.load import KGIndex
from kg_index.manifest import Manifest, index_files, record_files

logger = logging.getLogger(__name__)

CHUNK = 4096  # rows copied at a time (bounded memory on large indexes)


def base_vectors(index: KGIndex, rows: np.ndarray) -> np.ndarray:
    """The stored global vectors [len(rows), D] of base rows, read back from the FAISS index."""
    if index.exact is not None:
        return np.asarray(index.exact.vectors[rows], np.float32)
    inner = faiss.downcast_index(index.faiss_index)
    if isinstance(inner, faiss.IndexIVF):  # reconstruct needs a direct map: made on a copy, not the served index
        copy = faiss.clone_index(inner)  # kept in a name: the downcast view below does not own it
        inner = faiss.extract_index_ivf(copy)
        inner.make_direct_map()
        return np.asarray(copy.reconstruct_batch(np.asarray(rows, np.int64)), np.float32) if len(rows) else \
            np.zeros((0, index.faiss_index.d), np.float32)
    if not len(rows):
        return np.zeros((0, index.faiss_index.d), np.float32)
    return np.asarray(inner.reconstruct_batch(np.asarray(rows, np.int64)), np.float32)


def _new_faiss(index: KGIndex, vectors: np.ndarray) -> faiss.Index:
    inner = faiss.downcast_index(index.faiss_index)
    if isinstance(inner, faiss.IndexIVF):
        new = faiss.clone_index(inner)
        new.reset()  # keeps the trained coarse quantizer
    else:
        new = new_faiss_index(index.faiss_index.d, index.manifest.faiss_factory)
        if not new.is_trained:
            new.train(vectors)
    new.add(vectors)
    return new


def write_compacted(snap: KGIndex, out: Path) -> Manifest:
    """Write the live rows of snapshot snap as a complete index folder at out (which must not exist)."""
    m = snap.manifest
    if snap.delta is None:
        rows = np.arange(len(snap.ids))
        applied = 0
        n_base = len(snap.ids)
    else:
        rows = np.flatnonzero(~snap.delta.dead)
        applied = snap.delta.applied
        n_base = snap.delta.n_base
    if not len(rows):
        raise ValueError("nothing to compact into: every entity has been removed (an index needs at least one)")
    out.mkdir(parents=True)
    n = len(rows)
    text_local = np.lib.format.open_memmap(out / "text_local.npy", mode="w+", dtype=np.float16,
                                           shape=(n, m.max_tokens, m.local_dim))
    text_seg = np.lib.format.open_memmap(out / "text_seg.npy", mode="w+", dtype=np.uint8, shape=(n, m.max_tokens))
    old_images = np.asarray(snap.image_rows[rows], np.int64)
    image_rows = np.full(n, -1, np.int32)
    has = old_images >= 0
    image_rows[has] = np.arange(int(has.sum()), dtype=np.int32)
    for i in range(0, n, CHUNK):
        text_local[i : i + CHUNK] = snap.text_local[rows[i : i + CHUNK]]
        text_seg[i : i + CHUNK] = snap.text_seg[rows[i : i + CHUNK]]
    text_local.flush()
    text_seg.flush()
    del text_local, text_seg
    image_local = (np.asarray(snap.image_local[old_images[has]], np.float16) if has.any()
                   else np.zeros((0, m.image_patches, m.local_dim), np.float16))
    np.save(out / "image_local.npy", image_local)
    np.save(out / "image_rows.npy", image_rows)
    if snap.unit_globals is not None:
        np.save(out / "unit_globals.npy", np.asarray(snap.unit_globals[rows], np.float16))
    for name in ("image_blank.npy", "projections.npz"):  # index-wide, unchanged by entity changes
        if (snap.folder / name).is_file():
            shutil.copy2(snap.folder / name, out / name)

    in_base = rows < n_base
    vectors = np.zeros((n, m.global_dim), np.float32)
    vectors[in_base] = base_vectors(snap, rows[in_base])
    if (~in_base).any():
        assert snap.delta is not None
        vectors[~in_base] = snap.delta.vectors.numpy()[rows[~in_base] - n_base]
    faiss.write_index(_new_faiss(snap, vectors), str(out / "faiss.index"))
    ids = [snap.ids[r] for r in rows]
    (out / "ids.json").write_text(json.dumps(ids))
    with (out / "entities.jsonl").open("w") as f:
        for r in rows:
            e = snap.entities[r]
            row = {"id": e.id, "name": e.name, "description": e.description, "has_image": e.has_image}
            if e.start_year is not None or e.end_year is not None:
                row.update(start_year=e.start_year, end_year=e.end_year)
            if e.changed:  # kept across compactions: the KG file's image must never be served for it again
                row["changed"] = True
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    built = datetime.now(UTC)
    manifest = replace(m, version="", built_at=built.isoformat(timespec="seconds"), n_entities=n,
                       n_images=int(has.sum()), files={},
                       compacted={"from": snap.version, "changes": applied, "at": built.isoformat(timespec="seconds")})
    record_files(manifest, out, list(index_files(m.heads)))
    digest = hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()[:8]
    manifest.version = f"{built:%Y%m%dT%H%M%SZ}-{digest}"
    manifest.write(out)
    _fsync_tree(out)
    logger.info("compacted %s (%d changes) into %s: %d entities", snap.version, applied, manifest.version, n)
    return manifest


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with p.open("rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_dirs(a: Path, b: Path) -> None:
    """Swap folders a and b atomically (Linux renameat2 RENAME_EXCHANGE): a reader or a crash sees either the old
    or the new folder at each path, never neither. Elsewhere: two renames (a crash between them leaves b's old
    content at a and nothing at b, logged)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
            _fsync_parent(b)
            return
        err = ctypes.get_errno()
        logger.warning("renameat2 RENAME_EXCHANGE failed (%s); swapping with two renames", os.strerror(err))
    aside = b.parent / f".{b.name}.swap-{os.getpid()}"
    b.rename(aside)
    a.rename(b)
    aside.rename(a)
    _fsync_parent(b)


def _fsync_parent(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
