"""A live index with its change log: what a serving process holds to change entities while serving.

    apply(changes):  under the log's lock: read what other processes logged -> check -> append + fsync
                     -> LiveIndex.apply -> publish the new snapshot
    sync():          before each batch: take in what other processes logged, or the folder a compaction swapped in
    compact():       write the live rows into a fresh folder (outside the lock: updates and reads go on),
                     verify it like any index, then, under the locks, write the changes logged meanwhile into its
                     log, swap the folders atomically and publish the new base with those changes applied

Every step that changes what is served runs under `lock` (the caller's, shared with its index swaps), and
`publish(snapshot)` is called under it, so the caller's view never runs behind its own log. Several processes may
hold a store on one folder (`el serve --workers N`): each appends under the log file's lock after reading the
others' records, and `sync` brings each one's snapshot up to the log before it answers. One compaction runs at a
time across them (a lock on the folder); the others load the compacted folder when they see it swapped in.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from kg_index.changelog import ChangeLog, LogBusy, StaleFolder
from kg_index.compact import exchange_dirs, write_compacted
from kg_index.live import Change, LiveIndex
from kg_index.load import KGIndex, load_index

logger = logging.getLogger(__name__)

_TRIES = 3  # folders swapped in again while one is being opened: give up after this many


class UnknownEntity(KeyError):
    """A removal names an id the index does not hold."""


class LiveStore:
    def __init__(self, base: KGIndex, *, lock: threading.RLock | None = None,
                 publish: Callable[[KGIndex], None] | None = None, encoder_signature: str | None = None,
                 loader: Callable[[Path], KGIndex] | None = None) -> None:
        """Open base's change log (replaying it: the snapshot then includes every acknowledged change).
        `encoder_signature` is checked on the folders compactions write; `loader` loads (and checks, as a reload
        would) a folder another process swapped in at our path: a compaction's, or a rebuild in place."""
        self.lock = lock or threading.RLock()
        self._publish = publish or (lambda snap: None)
        self.encoder_signature = encoder_signature
        self._load = loader or (lambda folder: load_index(folder, encoder_signature=encoder_signature))
        self.folder = base.folder
        self.compacting = False
        self._unreadable: tuple[int, int] | None = None  # a swapped-in folder that failed to load
        with self.lock:
            self._open(base)

    def _open(self, base: KGIndex) -> None:
        log = ChangeLog(base.folder, base.version)  # StaleFolder when another index was swapped in meanwhile
        try:
            with log.locked():  # no one appends while a torn last record (a crash's) is cut
                changes = log.read_new(repair=log.writable)
        except BaseException:
            log.close()
            raise
        self.live = LiveIndex(base)
        self.log = log
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

    def sync(self) -> None:
        """Take in the changes other processes logged since, and a folder a compaction swapped in. Two stat calls
        when nothing changed; called before each batch, so that a change one process acknowledged is seen by the
        next link any of them answers."""
        if self.log.moved():
            with self.lock:
                self._catch_up()

    def _catch_up(self) -> None:
        """Under the lock: apply what the log holds past what this process read; follow a swapped folder."""
        changes = self.log.read_new()
        if changes:
            self._publish(self.live.apply(changes))
        if self.log.swapped():
            where = self.log.folder_identity()
            if where == self._unreadable:  # failed before: keep serving what we have, do not reload per batch
                return
            try:
                self._follow_swap()
            except Exception:
                logger.exception("cannot load the index folder swapped in at %s; still serving %s", self.folder,
                                 self.live.snapshot.version)
                self._unreadable = where

    def _follow_swap(self) -> None:
        """Another process compacted (or rebuilt) the folder: serve what is now at our path (its base and its log),
        as after a restart. Links of this process wait meanwhile (about 1.5 s for 41k entities), then see every
        change."""
        for _ in range(_TRIES):
            fresh = self._load(self.folder)
            old = self.log
            try:
                self._open(fresh)
            except StaleFolder:  # swapped again while it loaded
                continue
            old.close()
            logger.info("index folder %s was compacted or rebuilt by another process: now serving %s", self.folder,
                        self.live.snapshot.version)
            return
        raise StaleFolder(f"{self.folder}: swapped {_TRIES} times while loading it")

    def apply(self, changes: Sequence[Change]) -> KGIndex:
        """Log durably, then apply; the returned snapshot (already published) includes every change. Raises
        UnknownEntity, changing nothing, when a removal names an id not in the index at that point."""
        with self.lock:
            for _ in range(_TRIES):
                self._catch_up()
                log = self.log
                with log.locked():
                    if log.swapped():  # compacted just now: append to the new folder's log instead
                        continue
                    others = log.read_new(repair=True)  # logged by other processes since our last read
                    if others:
                        self._publish(self.live.apply(others))
                    missing = self.live.check(changes)
                    if missing is not None:
                        raise UnknownEntity(missing)
                    log.append(changes)
                snap = self.live.apply(changes)
                self._publish(snap)
                return snap
            raise StaleFolder(f"{self.folder}: swapped {_TRIES} times while changing it")

    def compact(self, *, encoder_signature: str | None = None) -> KGIndex:
        """Fold the log into a new folder at the same path and serve it; returns the new snapshot. LogBusy when
        another process is compacting this folder, RuntimeError when this one is."""
        signature = encoder_signature or self.encoder_signature
        with self.lock:
            if self.compacting:
                raise RuntimeError("a compaction is already running")
            self._catch_up()
            guard = _lock_folder(self.folder)
            if guard is not None and self.log.swapped():  # compacted by another process since the catch-up
                os.close(guard)
                guard = None
            if guard is None:
                raise LogBusy(f"{self.folder}: another process is compacting this index")
            self.compacting = True
            snap, offset, next_seq = self.live.snapshot, self.log.bytes, self.log.next_seq
        folder = self.folder
        tmp = folder.parent / f".{folder.name}.compacting-{os.getpid()}"
        try:
            for stale in folder.parent.glob(f".{folder.name}.compacting-*"):  # a killed compaction's (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            manifest = write_compacted(snap, tmp)
            fresh = load_index(tmp, encoder_signature=signature)  # the same checks as any served index
            with self.lock:
                old = self.log
                with old.locked():  # no process appends from here to the swap: what is logged now is carried
                    carried = old.read_from(offset, next_seq)
                    log = ChangeLog(tmp, fresh.version)
                    try:
                        if carried:
                            log.append(carried)
                    finally:
                        log.close()
                    exchange_dirs(tmp, folder)  # tmp now holds the old folder
                old.close()
                self._open(replace(fresh, folder=folder))
                logger.info("compaction done: %s -> %s (%d changes carried over)", snap.version, manifest.version,
                            len(carried))
                return self.live.snapshot
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(guard)
            with self.lock:
                self.compacting = False

    def close(self) -> None:
        with self.lock:
            self.log.close()


def _lock_folder(folder: Path) -> int | None:
    """An open descriptor of folder holding its compaction lock, or None when another process holds it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
