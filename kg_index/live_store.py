"""A live index with its change log: what the service holds to change entities while serving.

    apply(changes):  check -> append to changes.log + fsync -> LiveIndex.apply -> publish the new snapshot
    compact():       write the live rows into a fresh folder (outside the lock: updates and reads go on),
                     verify it like any index, then, under the lock, carry over the changes logged meanwhile,
                     swap the folders atomically and publish the new base with those changes applied

Every step that changes what is served runs under `lock` (the caller's, shared with its index swaps), and
`publish(snapshot)` is called under it, so the caller's view never runs behind the log.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

from kg_index.changelog import LOG_NAME, ChangeLog, read_log
from kg_index.compact import exchange_dirs, write_compacted
from kg_index.live import Change, LiveIndex
from kg_index.load import KGIndex, load_index
from kg_index.manifest import IndexIntegrityError

logger = logging.getLogger(__name__)


class UnknownEntity(KeyError):
    """A removal names an id the index does not hold."""


class LiveStore:
    def __init__(self, base: KGIndex, *, lock: threading.RLock | None = None,
                 publish: Callable[[KGIndex], None] | None = None) -> None:
        """Open base's change log (replaying it: the snapshot then includes every acknowledged change)."""
        self.lock = lock or threading.RLock()
        self._publish = publish or (lambda snap: None)
        self.compacting = False
        with self.lock:
            self._open(base)

    def _open(self, base: KGIndex, carried: Sequence[Change] = ()) -> None:
        changes = read_log(base.folder, base.version)
        if changes and carried:
            raise IndexIntegrityError(f"{base.folder / LOG_NAME}: a new folder's log must be empty")
        self.live = LiveIndex(base)
        self.log = ChangeLog(base.folder, base.version, len(changes) + 1)
        if carried:
            self.log.append(carried)
            changes = list(carried)
        if changes:
            self.live.apply(changes)
            logger.info("replayed %d logged changes onto index %s", len(changes), base.version)
        self._publish(self.live.snapshot)

    @property
    def snapshot(self) -> KGIndex:
        return self.live.snapshot

    @property
    def pending(self) -> int:
        """Changes logged since the base folder was written (what compaction would fold in)."""
        return self.live.applied

    def apply(self, changes: Sequence[Change]) -> KGIndex:
        """Log durably, then apply; the returned snapshot (already published) includes every change. Raises
        UnknownEntity, changing nothing, when a removal names an id not in the index at that point."""
        with self.lock:
            missing = self.live.check(changes)
            if missing is not None:
                raise UnknownEntity(missing)
            self.log.append(changes)
            snap = self.live.apply(changes)
            self._publish(snap)
            return snap

    def compact(self, *, encoder_signature: str | None = None) -> KGIndex:
        """Fold the log into a new folder at the same path and serve it; returns the new snapshot."""
        with self.lock:
            if self.compacting:
                raise RuntimeError("a compaction is already running")
            self.compacting = True
            snap, offset, next_seq = self.live.snapshot, self.log.bytes, self.log.next_seq
            base_version = self.live.base.version
        folder = snap.folder
        tmp = folder.parent / f".{folder.name}.compacting-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            manifest = write_compacted(snap, tmp)
            fresh = load_index(tmp, encoder_signature=encoder_signature)  # the same checks as any served index
            with self.lock:
                carried = read_log(folder, base_version, offset=offset, first_seq=next_seq, repair=False)
                exchange_dirs(tmp, folder)  # tmp now holds the old folder
                self.log.close()
                self._open(replace(fresh, folder=folder), carried)
                logger.info("compaction done: %s -> %s (%d changes carried over)", snap.version, manifest.version,
                            len(carried))
                return self.live.snapshot
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with self.lock:
                self.compacting = False

    def close(self) -> None:
        with self.lock:
            self.log.close()
