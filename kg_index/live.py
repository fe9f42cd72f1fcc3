"""A served index that changes: entities added, replaced and removed while it serves, without a rebuild.

The index folder (kg_index/build.py) is the *base*; changes live in a *delta* on top of it, like the growing
segment of a log-structured store:

- an added or replaced entity gets a new row after the base's rows (rows are never reused or rewritten); its
  global vector, local features (text tokens, segments, unit globals, image patches) go into append-only
  buffers, so every array the reranker gathers from (`text_local[rows, :m]`, `image_rows[rows]`, ...) is a
  `Stacked` view of the base's memory-mapped array followed by the appended rows;
- a replaced or removed entity's old row is marked dead: search never returns it (exact search masks it, FAISS
  indexes skip it through an IDSelector; HNSW cannot delete, IVF could, but a served FAISS index is never
  mutated, see below) and the id map points at its new row or nowhere;
- retrieval searches the base index (masked) and the appended vectors (an exact matmul: the delta is small,
  compaction folds it into the base) and merges the two top-k lists.

`LiveIndex` is the one writer; each `apply` returns a new immutable `KGIndex` snapshot. Readers hold the
snapshot they started with: appended buffers only grow past what an older snapshot sees (a full buffer is
copied into a larger one, never resized in place), dead masks and id maps are copied on write, and the base's
FAISS index is never modified. That is why deletes are masks rather than `remove_ids`: FAISS indexes are not
safe to mutate while another thread searches them, and a request in flight must finish on its own snapshot.
Compaction (kg_index/compact.py) writes the live rows into a fresh folder in the index's own type.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from kg_index.delta import Delta
from kg_index.load import EntityMeta, KGIndex

logger = logging.getLogger(__name__)


class Stacked:
    """Read-only rows of `base` [N, ...] followed by `tail` [A, ...], indexed like the arrays the reranker reads:
    an int or int array on the first axis (any shape), optionally followed by slices of the others."""

    def __init__(self, base: np.ndarray, tail: np.ndarray) -> None:
        self.base, self.tail = base, tail
        self.n_base = int(base.shape[0])
        self.shape = (self.n_base + int(tail.shape[0]), *base.shape[1:])
        self.dtype, self.ndim = base.dtype, base.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        idx = np.asarray(key)
        if idx.ndim == 0:
            i = int(idx)
            return self.base[(i, *rest)] if i < self.n_base else self.tail[(i - self.n_base, *rest)]
        in_tail = idx >= self.n_base
        if not in_tail.any():
            return self.base[(idx, *rest)]
        if in_tail.all():
            return self.tail[(idx - self.n_base, *rest)]
        trailing = self.tail[(slice(0, 0), *rest)].shape[1:]
        out = np.empty(idx.shape + trailing, self.dtype)
        out[~in_tail] = self.base[(idx[~in_tail], *rest)]
        out[in_tail] = self.tail[(idx[in_tail] - self.n_base, *rest)]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(np.concatenate([np.asarray(self.base), self.tail]), dtype=dtype)


class Growable:
    """An append-only array: `view()` is the rows appended so far and never changes afterwards (a full buffer is
    copied into one twice its size; the old one stays with the views taken from it)."""

    def __init__(self, row_shape: tuple[int, ...], dtype: np.dtype, capacity: int = 256) -> None:
        self._buf = np.zeros((capacity, *row_shape), dtype)
        self.n = 0

    def extend(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self._buf):
            bigger = np.zeros((max(need, 2 * len(self._buf)), *self._buf.shape[1:]), self._buf.dtype)
            bigger[: self.n] = self._buf[: self.n]
            self._buf = bigger
        self._buf[self.n : need] = rows
        self.n = need

    def view(self) -> np.ndarray:
        v = self._buf[: self.n]
        v.flags.writeable = False
        return v


class RowOf(Mapping[str, int]):
    """id -> row of a live snapshot: the delta's entries (-1: removed) over the base's id map."""

    def __init__(self, base: Mapping[str, int], delta: dict[str, int]) -> None:
        self.base, self.delta = base, delta

    def __getitem__(self, key: str) -> int:
        row = self.delta.get(key)
        if row is None:
            return self.base[key]
        if row < 0:
            raise KeyError(key)
        return row

    def __iter__(self) -> Iterator[str]:
        for i in self.base:
            if self.delta.get(i, 0) >= 0:
                yield i
        for i, r in self.delta.items():
            if r >= 0 and i not in self.base:
                yield i

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass(frozen=True)
class EntityRow:
    """What one entity adds to the index: its metadata and encoded features (as the build stores them)."""

    meta: EntityMeta
    global_: np.ndarray  # [D] fp32
    text_local: np.ndarray  # [T, d] fp16
    text_seg: np.ndarray  # [T] uint8
    image_local: np.ndarray | None  # [P, d] fp16, None without an image
    unit_globals: np.ndarray | None  # student indexes: [2, d] fp16


def rows_from_features(metas: Sequence[EntityMeta], feats, max_tokens: int) -> list[EntityRow]:
    """Featurizer output for entities (models/features.py: Features) -> one EntityRow each, padded to max_tokens
    and cast to the stored dtypes exactly as kg_index/build.py stores them."""
    out = []
    width = feats.text_local.shape[1]
    for j, meta in enumerate(metas):
        tl = np.zeros((max_tokens, feats.text_local.shape[2]), np.float16)
        ts = np.zeros(max_tokens, np.uint8)
        tl[:width] = feats.text_local[j].astype(np.float16)
        ts[:width] = feats.text_seg[j]
        present = bool(feats.image_present[j])
        out.append(EntityRow(
            replace(meta, has_image=present), np.asarray(feats.global_[j], np.float32), tl, ts,
            feats.image_local[j].astype(np.float16) if present else None,
            feats.unit_globals[j].astype(np.float16) if feats.unit_globals is not None else None))
    return out


@dataclass(frozen=True)
class Change:
    """One entity change: `row` set puts (adds or replaces) the entity, None removes it."""

    id: str
    row: EntityRow | None

    @property
    def op(self) -> str:
        return "put" if self.row is not None else "delete"


class LiveIndex:
    """The single writer over one base index: applies changes and hands out immutable snapshots. Not thread-safe
    itself: the caller serialises `apply` (readers only ever touch the snapshots)."""

    def __init__(self, base: KGIndex) -> None:
        if base.delta is not None:
            raise ValueError("the base of a live index must be a loaded folder, not a snapshot")
        self.base = base
        m = base.manifest
        self.n_base = len(base.ids)
        self.n_base_images = base.n_image_rows
        self._vectors = Growable((m.global_dim,), np.float32)
        self._text_local = Growable((m.max_tokens, m.local_dim), np.float16)
        self._text_seg = Growable((m.max_tokens,), np.uint8)
        self._image_rows = Growable((), np.int32)
        self._image_local = Growable((m.image_patches, m.local_dim), np.float16)
        self._unit_globals = Growable((2, m.local_dim), np.float16) if base.unit_globals is not None else None
        self._ids: list[str] = []
        self._entities: list[EntityMeta] = []
        self._delta_rows: dict[str, int] = {}
        self._dead = np.zeros(self.n_base, bool)
        self.applied = 0
        self._snapshot = base

    @property
    def snapshot(self) -> KGIndex:
        return self._snapshot

    def row(self, entity_id: str) -> int | None:
        """The live row of an id now, None when it is not in the index."""
        r = self._delta_rows.get(entity_id)
        if r is None:
            r = self.base.row_of.get(entity_id)
        return r if r is not None and r >= 0 else None

    def check(self, changes: Sequence[Change]) -> str | None:
        """Why these changes cannot apply in order (a removal of an id that is not there then), or None."""
        present: dict[str, bool] = {}
        for c in changes:
            there = present.get(c.id, self.row(c.id) is not None)
            if c.row is None and not there:
                return c.id
            present[c.id] = c.row is not None
        return None

    def apply(self, changes: Sequence[Change]) -> KGIndex:
        """Apply changes in order (validate with `check` first) and return the snapshot that includes them."""
        dead_rows = []
        for c in changes:
            old = self.row(c.id)
            if old is not None:
                dead_rows.append(old)
            if c.row is None:
                self._delta_rows[c.id] = -1
                continue
            e = c.row
            new_row = self.n_base + len(self._ids)
            self._ids.append(c.id)
            self._entities.append(e.meta)
            self._vectors.extend(e.global_[None])
            self._text_local.extend(e.text_local[None])
            self._text_seg.extend(e.text_seg[None])
            if e.image_local is not None:
                self._image_rows.extend(np.array([self.n_base_images + self._image_local.n], np.int32))
                self._image_local.extend(e.image_local[None])
            else:
                self._image_rows.extend(np.array([-1], np.int32))
            if self._unit_globals is not None:
                assert e.unit_globals is not None, "a student index needs unit globals for every entity"
                self._unit_globals.extend(e.unit_globals[None])
            self._delta_rows[c.id] = new_row
        dead = np.zeros(self.n_base + len(self._ids), bool)  # copied on write: older snapshots keep theirs
        dead[: len(self._dead)] = self._dead
        dead[dead_rows] = True
        self._dead = dead
        self.applied += len(changes)
        self._snapshot = self._make_snapshot()
        return self._snapshot

    def _make_snapshot(self) -> KGIndex:
        b = self.base
        dead_base = self._dead[: self.n_base]
        any_dead_base = bool(dead_base.any())
        bits = None
        if any_dead_base and b.exact is None:
            bits = np.packbits(~dead_base, bitorder="little")
        delta = Delta(
            n_base=self.n_base,
            vectors=torch.from_numpy(self._vectors.view().copy()) if self._vectors.n else torch.zeros(0, b.manifest.global_dim),
            dead=self._dead, dead_base_t=torch.from_numpy(dead_base.copy()) if any_dead_base else None,
            base_selector_bits=bits, applied=self.applied)
        return replace(
            b, ids=b.ids + self._ids, entities=b.entities + self._entities,
            row_of=RowOf(b.row_of, dict(self._delta_rows)),
            text_local=Stacked(b.text_local, self._text_local.view()),
            text_seg=Stacked(b.text_seg, self._text_seg.view()),
            image_rows=Stacked(b.image_rows, self._image_rows.view()),
            image_local=Stacked(b.image_local, self._image_local.view()),
            unit_globals=Stacked(b.unit_globals, self._unit_globals.view()) if self._unit_globals is not None else None,
            delta=delta)

    def live_rows(self) -> np.ndarray:
        """The rows of the current snapshot that are live, in order (base rows first)."""
        return np.flatnonzero(~self._dead)

    def appended_vectors(self) -> np.ndarray:
        return self._vectors.view()
