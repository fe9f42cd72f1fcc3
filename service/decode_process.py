"""POST /v1/entities:batch bodies decoded in a process of its own: JSON parsing, base64 and image decoding.

Why a process: those steps hold the GIL in long stretches (a 32-photo body is ~30 MB: decoded to text, parsed item
by item, ~1 MB of base64 per photo), and every /v1/link thread must retake the GIL dozens of times a request. In
the server process, with the update threads at a lower CPU priority, a decoder preempted while it holds the GIL
stalls the links as well. Measured with `el bench-updates` (four runs each way, alternating, on a 2-core VM): the
link p99 during photo updates went from 90-118 ms to 72-80 ms (README: Changing the KG while serving).

The route streams the body to a spool file; for a body of CHILD_MIN_BYTES or more (photos) the child (spawned on
first use, at the update threads' lower priority) parses it, keeps the items and decodes them one by one on request, in order: the update worker encodes
each change as soon as it is decoded, as before. Each decode sends back the change's text, years and image at its
decoded size (a few hundred KB, not the base64) and the child's decode counters, added to this process's
`el_image_*` metrics. If the child dies (killed, out of memory), the request in flight is finished in this
process from the same spool file, and the next request starts a new child; EL_UPDATES__DECODE_PROCESS=false
decodes in this process's update threads always.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from service.entity_decode import DecodedChange, decode_change, parse_batch
from service.errors import ELError
from service.pipeline.decode import DECODE_COUNTS, DecodeCounts
from service.schemas import EntityBatchItem
from service.settings import Settings

logger = logging.getLogger(__name__)

# Smaller bodies (text-only batches: ~10 KB for 32 entities) are parsed and decoded in the server's update threads:
# sending each item to the child and its result back costs more than the decoding itself (text-only updates ran
# ~13 % slower through the child, and the links' p99 rose with the extra thread traffic).
CHILD_MIN_BYTES = 1 << 20

# ---- the child process (module state lives in the child only) ----

_settings: Settings | None = None
_batches: dict[int, list[EntityBatchItem | None]] = {}


def _child_init(settings: Settings, nice: int) -> None:
    global _settings
    _settings = settings
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except (OSError, AttributeError):
            pass  # not permitted: the child runs at normal priority


def _child_parse(bid: int, path: str, ctype: str, cap: int) -> list[tuple[str, str]]:
    items: list[EntityBatchItem | None] = list(parse_batch(Path(path).read_bytes(), ctype, cap))
    _batches[bid] = items
    return [(i.id, i.op) for i in items if i is not None]


def _child_decode(bid: int, j: int) -> tuple[DecodedChange | None, DecodeCounts, ELError | None]:
    """Item j decoded, the decoding work it took (counted in the server's metrics, refused or not) and its 4xx."""
    assert _settings is not None
    item = _batches[bid][j]
    _batches[bid][j] = None  # its base64 is not needed again
    assert item is not None
    before = DECODE_COUNTS.snapshot()
    try:
        return decode_change(item.id, item, _settings), DECODE_COUNTS.snapshot() - before, None
    except ELError as exc:
        return None, DECODE_COUNTS.snapshot() - before, exc


def _child_forget(bid: int) -> None:
    _batches.pop(bid, None)


# ---- the server side ----


class DecodeProcess:
    """The child process that decodes entity batches (one, started on first use, replaced if it dies)."""

    def __init__(self, settings: Settings, *, nice: int = 0, enabled: bool = True,
                 min_bytes: int = CHILD_MIN_BYTES) -> None:
        self.settings, self.nice, self.enabled, self.min_bytes = settings, nice, enabled, min_bytes
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._ids = itertools.count()
        self._closed = False  # the app is stopping: no new child

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the server has threads (a forked child could inherit a held lock).
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_child_init, initargs=(self.settings, self.nice))
            return self._pool

    def _broken(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)
        logger.error("the entity decoding process is gone; this request is decoded in the server, the next one "
                     "starts a new process")

    async def open(self, path: Path, ctype: str) -> EntityBatch:
        """Parse a spooled batch body (in the child, or here when it is off or dies): its changes' (id, op)
        and their decoders, in order. Raises the body's 4xx."""
        cap = self.settings.updates.max_batch_items
        batch = EntityBatch(self, path, ctype, cap)
        if self.enabled and not self._closed and path.stat().st_size >= self.min_bytes:
            pool = self._executor()
            bid = next(self._ids)
            try:
                parsed = pool.submit(_child_parse, bid, str(path), ctype, cap)
                ops = await asyncio.wrap_future(parsed)
            except BrokenProcessPool:  # it died: decode here
                self._broken(pool)
            except RuntimeError:
                if self._pool is pool:  # the pool still stands: the child's own error (a 500)
                    raise
                # shut down meanwhile (another request found it dead, or the app is stopping): decode here
            else:
                batch.attach(pool, bid, ops)
                return batch
        await asyncio.to_thread(batch.parse_here)
        return batch

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class EntityBatch:
    """One request's changes: `ops` [(id, op)] and `decoders` (one callable each, run by the update worker's
    decode thread in order). `close()` when the request is done, whatever happened."""

    def __init__(self, owner: DecodeProcess, path: Path, ctype: str, cap: int) -> None:
        self._owner, self._path, self._ctype, self._cap = owner, path, ctype, cap
        self._pool: ProcessPoolExecutor | None = None
        self._bid = -1
        self._futures: list[Future] = []
        self._items: list[EntityBatchItem] | None = None  # parsed here (no child, or it died)
        self.ops: list[tuple[str, str]] = []

    def attach(self, pool: ProcessPoolExecutor, bid: int, ops: list[tuple[str, str]]) -> None:
        self._pool, self._bid, self.ops = pool, bid, ops
        # Queued now, run in order by the child while the update worker encodes those done before.
        try:
            self._futures = [pool.submit(_child_decode, bid, j) for j in range(len(ops))]
        except (BrokenProcessPool, RuntimeError):  # died since the parse, or shutting down: decode here
            self._owner._broken(pool)
            self._pool = None

    def parse_here(self) -> None:
        if self._items is None:
            self._items = parse_batch(self._path.read_bytes(), self._ctype, self._cap)
            self.ops = [(i.id, i.op) for i in self._items]

    @property
    def decoders(self) -> list[Callable[[], DecodedChange]]:
        return [lambda j=j: self._decode(j) for j in range(len(self.ops))]

    def _decode(self, j: int) -> DecodedChange:
        if self._pool is not None:
            try:
                out, spent, error = self._futures[j].result()
            except BrokenProcessPool:
                self._owner._broken(self._pool)
                self._pool = None
            else:
                DECODE_COUNTS.add(base64_bytes=spent.base64_bytes, image_decodes=spent.image_decodes,
                                  pixels=spent.pixels)
                if error is not None:
                    raise error
                assert out is not None
                return out
        self.parse_here()
        assert self._items is not None
        item = self._items[j]
        return decode_change(item.id, item, self._owner.settings)

    def close(self) -> None:
        """Drop what the child still holds of this request (its undecoded items, after a failed one)."""
        for f in self._futures:
            f.cancel()
        if self._pool is not None:
            try:
                self._pool.submit(_child_forget, self._bid)
            except (BrokenProcessPool, RuntimeError):  # dead or shut down: nothing left to forget
                pass
        self._items = None
