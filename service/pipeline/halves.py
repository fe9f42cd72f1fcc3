"""A batch that runs alone takes both cores: it is linked as two halves at once.

The pipeline's own stages are mostly single-threaded: ONNX Runtime encodes on every core, but retrieval, the OT
rerank (torch on one thread, EL_RERANK__TORCH_THREADS=1, right when two batches run at once) and the string and
KG terms run on one. With two batches in flight (EL_BATCHING__MAX_CONCURRENT=2) both cores are busy anyway; a batch
that finds no other running leaves one idle for most of its time. Such a batch, when it is large enough, is cut
in two halves linked at once, one in a helper thread, from the same index snapshot. The halves give the answers
the whole batch gives (each mention is scored on its own; a test compares them). `scripts/bench_halves.py`
(reports/bench-halves.json; 2,048 WikiMEL test mentions, batches of 64, one caller, alternating rounds on the 2-core
Xeon): 1.24x the mentions/s with OT on every mention and 1.16x with the adaptive rerank, for 11 % and 5 % more CPU
per mention; the same top-1 everywhere. Over HTTP (*exploratory*, wrk, alternating servers) it gave about 1.1x the
requests/s at concurrency 8 and 32: even there one of the two batch slots is often empty.

A batch alone but below the minimum lends the idle helper thread to its search instead (kg_index/exact.py
`spare_core`): one or two queries then scan the index in two row halves at once, where the index's search plan
measured that faster than FAISS's one-thread scan (on the Xeon: 1.9 against 2.8 ms a query; a lone request's p50 in
process 11.2 -> 9.5 ms, *exploratory*). Splitting smaller work (a single mention's 32 OT problems in two) was
slower: the two threads then mostly wait for each other's GIL.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Occupancy:
    """Batches in flight through one Linker and its copies; whether a new one runs alone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self._helper: ThreadPoolExecutor | None = None

    @contextmanager
    def enter(self) -> Iterator[bool]:
        """Count a batch in for the block; yields True when no other batch was running."""
        with self._lock:
            self.count += 1
            alone = self.count == 1
        try:
            yield alone
        finally:
            with self._lock:
                self.count -= 1

    def helper(self) -> ThreadPoolExecutor:
        """The one thread that links the second half (one batch at a time runs alone, so one is enough)."""
        with self._lock:
            if self._helper is None:
                self._helper = ThreadPoolExecutor(1, thread_name_prefix="link-half")
            return self._helper


def in_halves(occupancy: Occupancy, items: list, run: Callable[[list], T], merge: Callable[[T, T], T]) -> T:
    """run(first half) here and run(second half) in the helper thread, at once; merge(first, second). Both have
    finished when this returns or raises (an error of either half is raised, the first half's first)."""
    half = len(items) // 2
    later = occupancy.helper().submit(run, items[half:])
    try:
        first = run(items[:half])
    except BaseException:
        wait([later])
        raise
    return merge(first, later.result())
