"""The visual term of a mention without an image, remembered per candidate image.

The student's visual unit compares the mention's image with the candidate's. A mention without an image is given
the blank image's features, the same for every such mention (student_rerank already solves one problem for all
of them against one candidate image), so its visual g2l term against a candidate depends only on that candidate's
image row: text-only traffic solves the same 49 x 49 problems again and again (a lone text request: 32 of them, about
a tenth of its time on a 2-core CPU). `BlankVisualMemo` keeps each value once solved, per index and solver
setting, and student_rerank solves only the rows it has not seen.

Only the rows of an index as loaded are kept (a live index appends rows: those are solved each time), so that
the row numbers always mean the same image; the memo belongs to the loaded image array, and goes with it (a
reload or a compaction starts a new one). Values are what the solver gave in the batch that first met the row;
Sinkhorn's result does not depend on its batch neighbours, and the pooling's only up to float rounding (~1e-7).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from kg_index.live import Stacked

# id(loaded image array) -> memos by solver setting; an entry goes when its array does (arrays are not hashable,
# so not WeakKeyDictionary keys; the finalizer drops the entry before the id can be reused)
_memos: dict[int, dict[tuple, BlankVisualMemo]] = {}
_lock = threading.Lock()


class BlankVisualMemo:
    """g2l_visual(blank mention, candidate image row) for the n image rows of one loaded index, and slot n for a
    candidate without an image. Written and read under the GIL by whichever batch gets there first: two batches
    that solve the same row write the same value."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.values = np.zeros(n + 1, np.float32)
        self.known = np.zeros(n + 1, bool)
        self.hits = 0  # values served from here (tests, metrics)

    def slots(self, image_rows: np.ndarray) -> np.ndarray:
        """Image rows (-1: no image) -> slots; -1 where the row is not kept (appended by a live index)."""
        return np.where(image_rows < 0, self.n, np.where(image_rows < self.n, image_rows, -1))

    def store(self, slots: np.ndarray, values: np.ndarray) -> None:
        keep = slots >= 0
        self.values[slots[keep]] = values[keep]
        self.known[slots[keep]] = True  # after the values: a reader that sees it known reads the value


def memo_for(image_local: Any, key: tuple) -> BlankVisualMemo:
    """The memo of a loaded index's image array (for a live snapshot: the array it was loaded with) under a
    solver setting `key` (the values depend on eps, tolerance, iterations and domain)."""
    base = image_local.base if isinstance(image_local, Stacked) else image_local
    with _lock:
        by_key = _memos.get(id(base))
        if by_key is None:
            by_key = _memos[id(base)] = {}
            weakref.finalize(base, _memos.pop, id(base), None)
        if key not in by_key:
            by_key[key] = BlankVisualMemo(int(base.shape[0]))
        return by_key[key]
