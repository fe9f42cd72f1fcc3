"""Entity changes while serving: decode, encode, log, apply; and compaction in the background.

Each request's items are decoded in a decoding thread (item after item: text rules and the image rules of /v1/link)
while one update worker thread takes the requests in arrival order: it encodes the entities to put, as soon as a
batch of EL_UPDATES__ENCODE_BATCH is decoded (so decoding and encoding overlap), through the same runtime and
featurizer as the index build (Linker.encode_entities), then hands all of a request's changes to the live index
in one call (Linker.apply_changes: one log write and fsync, then the new snapshot is published). The answer is
sent after that: the change is on disk and the next /v1/link batch sees it. One worker keeps updates to about one
core, so links keep the other; a request that would take the waiting changes past EL_UPDATES__MAX_PENDING gets 429.

Once the log holds EL_UPDATES__COMPACT_AFTER changes, a background thread folds it into a fresh folder
(Linker.compact); POST /v1/admin/compact and `el compact-index` start the same.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from kg_index.changelog import LogBusy, StaleFolder
from kg_index.live import Change
from kg_index.live_store import UnknownEntity
from kg_index.load import EntityMeta, KGIndex
from service.entity_decode import DecodedChange
from service.errors import Conflict, EntityNotFound, Overloaded, UpdatesDisabled
from service.heap import freeze_loaded_heap
from service.metrics import Metrics
from service.pipeline.linker import Linker

logger = logging.getLogger(__name__)

ENCODE_LEAST = 8  # entities per update encoder call when it would otherwise wait for the decoder


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value by `nice` (Linux schedules threads alone; elsewhere the whole process)."""
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except (OSError, AttributeError):  # not permitted or not supported: updates run at normal priority
            logger.warning("could not lower the update threads' CPU priority")


@dataclass
class PendingChange:
    """One decoded change: meta and image for a put, meta None for a delete."""

    id: str
    meta: EntityMeta | None
    image: Image.Image | None = None


def pending_change(d: DecodedChange) -> PendingChange:
    """A decoded change as the update worker takes it (the meta the index stores, marked changed)."""
    if d.name is None:
        return PendingChange(d.id, None)
    meta = EntityMeta(d.id, d.name, d.description, d.image is not None, d.start_year, d.end_year, changed=True)
    return PendingChange(d.id, meta, d.image)


class EntityUpdater:
    def __init__(self, linker: Callable[[], Linker], *, encode_batch: int, max_pending: int, compact_after: int,
                 enabled: bool, metrics: Metrics | None = None, nice: int = 0) -> None:
        self._linker = linker
        self.metrics = metrics
        self.encode_batch = encode_batch
        self.max_pending = max_pending
        self.compact_after = compact_after
        self.enabled = enabled
        # Both update threads run at a lower CPU priority (a higher nice value, Linux: per thread), so that under
        # contention the kernel gives /v1/link's threads the cores first and updates take what is left.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="el-updates", initializer=_lower_priority,
                                        initargs=(nice,))
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="el-updates-decode",
                                           initializer=_lower_priority, initargs=(nice,))
        self.pending = 0
        self._compactor: threading.Thread | None = None
        self.last_compaction_error: str | None = None

    def require_live(self) -> Linker:
        """The linker whose index takes changes, or the 409 (or 503) saying why not."""
        return self._live()

    def _live(self) -> Linker:
        linker = self._linker()
        if not self.enabled:
            raise UpdatesDisabled("this server does not take entity changes (EL_UPDATES__ENABLED=false)")
        if linker.store is None:  # a Ray Serve replica: each holds its own copy, maybe on another machine
            raise UpdatesDisabled("this server's index takes no entity changes (Ray Serve replicas do so only with "
                                  "EL_RAY__SHARED_INDEX=true, where every node sees the one index folder; else "
                                  "change the KG through `el serve`, compact, then redeploy)")
        return linker

    async def submit(self, n: int, decoders: Sequence[Callable[[], PendingChange]]) -> KGIndex:
        """Decode the n changes (one callable each) and apply them in the update worker; the snapshot that
        includes them."""
        self._live()
        if self.pending + n > self.max_pending:
            raise Overloaded(f"{self.pending} entity changes are waiting; retry later", headers={"Retry-After": "1"})
        self.pending += n
        # Decoding (JSON items, base64, images: a few ms of CPU for a large photo) runs in one thread of its own,
        # item after item, requests in arrival order, while the update worker encodes the items decoded before:
        # the two overlap within a request, never block the loop, and never take more than two threads.
        decoding = [self._decoder.submit(d) for d in decoders]
        try:
            return await asyncio.wrap_future(self._pool.submit(self._run, decoding))
        finally:
            for f in decoding:  # a request that failed (or was refused) decodes nothing more
                f.cancel()
            self.pending -= n

    def _run(self, decoding: Sequence[Future[PendingChange]]) -> KGIndex:
        linker = self._live()
        pending: list[PendingChange] = []
        rows = {}
        chunk: list[PendingChange] = []

        def encode() -> None:
            encoded = linker.encode_entities([p.meta for p in chunk], [p.image for p in chunk])  # type: ignore[misc]
            rows.update({id(p): r for p, r in zip(chunk, encoded)})
            chunk.clear()

        least = min(ENCODE_LEAST, self.encode_batch)
        for i, fut in enumerate(decoding):  # a bad item raises its 4xx here: nothing is applied
            p = fut.result()
            pending.append(p)
            if p.meta is not None:
                chunk.append(p)
                # Encode what is decoded once the next item is not ready (photos: the encoder works while the
                # decoder goes on), in calls of at least `least` (each call has a fixed cost) and at most
                # encode_batch entities (the encoder runs rows in length bands: larger calls pad less).
                ahead = i + 1 < len(decoding) and decoding[i + 1].done()
                if len(chunk) >= self.encode_batch or (len(chunk) >= least and not ahead):
                    encode()
        if chunk:
            encode()
        changes = [Change(p.id, rows[id(p)] if p.meta is not None else None) for p in pending]
        try:
            snap = linker.apply_changes(changes)
        except UnknownEntity as exc:
            raise EntityNotFound(f"no entity with id {exc.args[0]!r} to delete (nothing in this request applied)") from None
        except StaleFolder:
            raise Conflict("the index folder was swapped again and again by compactions meanwhile; retry "
                           "(nothing applied)", headers={"Retry-After": "1"}) from None
        except OSError as exc:  # a read-only or full index folder: nothing was acknowledged
            logger.error("cannot write the change log: %s", exc)
            raise UpdatesDisabled(f"cannot write the change log ({exc.__class__.__name__}); nothing applied") from None
        if self.metrics is not None:
            for op in ("put", "delete"):
                if n := sum(1 for c in changes if c.op == op):
                    self.metrics.entity_changes.labels(op).inc(n)
            self.metrics.change_log.set(linker.store.pending if linker.store is not None else 0)
        if self.compact_after and linker.store is not None and linker.store.pending >= self.compact_after:
            self.start_compaction(linker)
        return snap

    def start_compaction(self, linker: Linker | None = None) -> threading.Thread:
        """Compact in a background thread (Conflict when one is running)."""
        linker = linker or self._live()
        if self._compactor is not None and self._compactor.is_alive():
            raise Conflict("a compaction is already running")
        self._compactor = threading.Thread(target=self._compact, args=(linker,), name="el-compact", daemon=True)
        self._compactor.start()
        return self._compactor

    def _compact(self, linker: Linker) -> None:
        try:
            linker.compact()
            freeze_loaded_heap()  # the compacted index's objects, as at start-up
            self.last_compaction_error = None
            outcome = "ok"
        except LogBusy as exc:  # another server process on this folder compacts it; this one will load the result
            logger.info("not compacting: %s", exc)
            self.last_compaction_error = str(exc)
            outcome = "busy"
        except Exception as exc:  # logged and kept for the admin route; the old index keeps serving
            logger.exception("compaction failed; still serving the index and its change log")
            self.last_compaction_error = f"{type(exc).__name__}: {exc}"
            outcome = "failed"
        if self.metrics is not None:
            self.metrics.compactions.labels(outcome).inc()
            self.metrics.change_log.set(linker.store.pending if linker.store is not None else 0)

    def wait_compaction(self, timeout: float | None = None) -> None:
        if self._compactor is not None:
            self._compactor.join(timeout)

    def close(self) -> None:
        self._decoder.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        self.wait_compaction()
