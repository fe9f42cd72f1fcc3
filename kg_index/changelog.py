"""The change log of a live index: `changes.log` in the index folder, written before a change is acknowledged.

One record per change, appended and fsynced (a batch of changes is one write and one fsync):

    b"ELCL" | u32 header bytes | u64 payload bytes | SHA-256 of header + payload (32 bytes) | header | payload

The header is JSON: the change's sequence number (1, 2, ... since the base), the base index's version, the op
(put / delete), the entity id and metadata, and where each feature array lies in the payload (dtype, shape,
offset). The payload is the arrays' raw bytes: replaying the log at start-up needs no encoder and gives the very
features that were served. Every record is checked on replay; a last record cut short by a crash (its write never
finished, so it was never acknowledged) is dropped and the file truncated to the last whole record. A bad record
followed by others, a record of another base index or a sequence gap refuses the folder (IndexIntegrityError
naming the file), like any other damaged index file. Compaction (kg_index/compact.py) folds the log into a new
folder, whose log starts with the changes logged while it was written.

Several processes may serve one folder and change it (`ChangeLog`): appends are serialised by a lock on the file,
and each process reads the records the others appended before it appends, and before each batch it links.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kg_index.live import Change, EntityRow
from kg_index.load import EntityMeta
from kg_index.manifest import IndexIntegrityError

logger = logging.getLogger(__name__)

LOG_NAME = "changes.log"
MAGIC = b"ELCL"
_HEAD = struct.Struct("<4sIQ32s")
_ARRAYS = ("global_", "text_local", "text_seg", "image_local", "unit_globals")


def encode_record(seq: int, base_version: str, change: Change) -> bytes:
    header: dict = {"seq": seq, "base": base_version, "op": change.op, "id": change.id}
    payload = bytearray()
    if change.row is not None:
        m = change.row.meta
        header["entity"] = {"name": m.name, "description": m.description, "has_image": m.has_image,
                            "start_year": m.start_year, "end_year": m.end_year, "changed": m.changed}
        arrays = []
        for name in _ARRAYS:
            a = getattr(change.row, name)
            if a is None:
                continue
            a = np.ascontiguousarray(a)
            arrays.append([name, a.dtype.str, list(a.shape), len(payload)])
            payload += a.tobytes()
        header["arrays"] = arrays
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    digest = hashlib.sha256(head + payload).digest()
    return _HEAD.pack(MAGIC, len(head), len(payload), digest) + head + bytes(payload)


def decode_header(head: bytes, payload: bytes) -> tuple[dict, Change]:
    header = json.loads(head)
    if header["op"] == "delete":
        return header, Change(header["id"], None)
    arrays = {name: np.frombuffer(payload, np.dtype(dt), int(np.prod(shape)), off).reshape(shape)
              for name, dt, shape, off in header["arrays"]}
    e = header["entity"]
    meta = EntityMeta(header["id"], e["name"], e["description"], bool(e["has_image"]), e["start_year"], e["end_year"],
                      changed=bool(e.get("changed", True)))  # records written before the flag all came through the API
    row = EntityRow(meta, arrays["global_"], arrays["text_local"], arrays["text_seg"], arrays.get("image_local"),
                    arrays.get("unit_globals"))
    return header, Change(header["id"], row)


def _parse(data: bytes | memoryview, base_version: str, offset: int, first_seq: int,
           where: Path) -> tuple[list[Change], int, str | None]:
    """The whole records at the start of data (read from byte `offset` of the log, the first being `first_seq`):
    (changes, bytes they take, why the rest is not a whole record or None). A last record cut short or failing its
    checksum is "the rest" (a write not finished, or never finished); anything else wrong raises
    IndexIntegrityError."""
    changes: list[Change] = []
    pos = 0
    while pos < len(data):
        at = f"{where}: record {first_seq + len(changes)} at byte {offset + pos}"
        if len(data) - pos < _HEAD.size:
            return changes, pos, at + " is cut short"
        magic, hlen, plen, digest = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + hlen + plen
        if magic != MAGIC:
            raise IndexIntegrityError(f"{at}: bad record marker (corrupted)")
        if end > len(data):
            return changes, pos, at + " is cut short"
        body = bytes(data[pos + _HEAD.size : end])
        if hashlib.sha256(body).digest() != digest:
            if end == len(data):  # the last record, written but not wholly on disk: never acknowledged
                return changes, pos, at + " fails its checksum"
            raise IndexIntegrityError(f"{at}: checksum mismatch (corrupted or modified)")
        try:
            header, change = decode_header(body[:hlen], body[hlen:])
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexIntegrityError(f"{at}: unreadable ({exc.__class__.__name__})") from exc
        if header["base"] != base_version:
            raise IndexIntegrityError(f"{at}: belongs to index {header['base']}, the folder holds {base_version}")
        if header["seq"] != first_seq + len(changes):
            raise IndexIntegrityError(f"{at}: sequence {header['seq']}, expected {first_seq + len(changes)}")
        changes.append(change)
        pos = end
    return changes, pos, None


def read_log(folder: Path, base_version: str, *, repair: bool = True, offset: int = 0,
             first_seq: int = 1) -> list[Change]:
    """Every change recorded for the index at folder (built as base_version), in order, from byte `offset` (where
    record `first_seq` starts). A torn last record is dropped (and, with repair, cut from the file); anything else
    wrong raises IndexIntegrityError. (Offline use; a serving process reads through its ChangeLog.)"""
    path = folder / LOG_NAME
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    changes, used, torn = _parse(data, base_version, offset, first_seq, path)
    if torn is not None:
        logger.warning("%s: dropping the unfinished last record (%d bytes; it was never acknowledged)", torn,
                       len(data) - used)
        if repair:
            with path.open("r+b") as f:
                f.truncate(offset + used)
                f.flush()
                os.fsync(f.fileno())
    return changes


class ChangeLog:
    """This process's handle on the change log of one index folder. Every process serving the folder holds one
    (the worker processes of `el serve --workers N`, a second server, `el compact-index`), and any of them may
    change the index:

    - an append takes an exclusive lock on the file for its write only (`locked`), after reading what the others
      appended meanwhile (`read_new`), so that records stay in sequence and every process applies the same ones;
    - `moved` tells with two stat calls whether another process appended, or swapped in a compacted folder, since
      this one last read: a reader calls it before each batch, which is how a change acknowledged by one process
      is in the next link answered by any of them.

    The handle follows the folder it was opened on (an open directory and log file): after a compaction swaps
    another folder in at the same path, `swapped` is true and the owner opens the new one."""

    def __init__(self, folder: Path, base_version: str) -> None:
        self.folder = folder
        self.path = folder / LOG_NAME
        self.base_version = base_version
        self.next_seq = 1
        self.bytes = 0  # how much of the file this process has read (whole records)
        self._torn_at: tuple[int, int] | None = None  # (size, mtime) when an unfinished record was seen: not re-read
        self._dir = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        self._dir_id = _identity(os.fstat(self._dir))
        self.fd: int | None = None
        self.writable = True
        try:
            self._check_version()
            try:
                exists = _exists(self._dir)
                self.fd = os.open(LOG_NAME, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644, dir_fd=self._dir)
                if not exists:  # the new directory entry must survive a crash too
                    os.fsync(self._dir)
            except OSError:  # a read-only folder: serve it, follow a log someone else writes, change nothing
                self.writable = False
                if _exists(self._dir):
                    self.fd = os.open(LOG_NAME, os.O_RDONLY, dir_fd=self._dir)
        except BaseException:
            self.close()
            raise

    def _check_version(self) -> None:
        """The folder opened is the one loaded: a compaction may have swapped another in since (StaleFolder)."""
        fd = os.open("manifest.json", os.O_RDONLY, dir_fd=self._dir)
        with os.fdopen(fd, "rb") as f:
            version = json.loads(f.read()).get("version")
        if version != self.base_version:
            raise StaleFolder(f"{self.folder}: now holds index {version}, not {self.base_version}")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive against every other process's append (and compaction's swap) while inside."""
        if self.fd is None:
            yield
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def read_new(self, *, repair: bool = False) -> list[Change]:
        """The changes appended since this process last read (by any process), in order. An unfinished last record
        is left for later (another process may be writing it); with `repair` (only under `locked`, where no one
        writes) it is a crash's, never acknowledged, and is cut from the file."""
        if self.fd is None:
            return []
        size = os.fstat(self.fd).st_size
        if size <= self.bytes:
            return []
        data = _pread_all(self.fd, size - self.bytes, self.bytes)
        changes, used, torn = _parse(data, self.base_version, self.bytes, self.next_seq, self.path)
        if torn is not None:
            if repair:
                logger.warning("%s: dropping the unfinished last record (%d bytes; it was never acknowledged)", torn,
                               len(data) - used)
                os.ftruncate(self.fd, self.bytes + used)
                os.fsync(self.fd)
            else:
                st = os.fstat(self.fd)
                self._torn_at = (st.st_size, st.st_mtime_ns)
        self.bytes += used
        self.next_seq += len(changes)
        return changes

    def read_from(self, offset: int, first_seq: int) -> list[Change]:
        """The changes from byte `offset` (record `first_seq`) to the end, as they are now (under `locked`)."""
        if self.fd is None:
            return []
        size = os.fstat(self.fd).st_size
        data = _pread_all(self.fd, size - offset, offset)
        return _parse(data, self.base_version, offset, first_seq, self.path)[0]

    def moved(self) -> bool:
        """Whether another process appended or swapped the folder since this one last read (cheap: two stats)."""
        fd = self.fd  # read once: the owner may close this handle meanwhile (it then holds a new one)
        if fd is not None:
            try:
                st = os.fstat(fd)
            except OSError:  # closed just now: look again under the owner's lock
                return True
            if st.st_size > self.bytes and (st.st_size, st.st_mtime_ns) != self._torn_at:
                return True
        return self.swapped()

    def folder_identity(self) -> tuple[int, int] | None:
        """(device, inode) of what the folder's path holds now."""
        try:
            return _identity(os.stat(self.folder))
        except FileNotFoundError:
            return None

    def swapped(self) -> bool:
        """The folder's path holds another folder now (a compaction swapped it in)."""
        try:
            return _identity(os.stat(self.folder)) != self._dir_id
        except FileNotFoundError:  # between the two renames of a swap without renameat2: not yet
            return False

    def append(self, changes: Iterable[Change]) -> int:
        """Write the changes and fsync; the sequence number of the last one. Call under `locked`, after
        `read_new` has applied every record before them. Only then may they be applied."""
        blob = bytearray()
        seq = self.next_seq
        for c in changes:
            blob += encode_record(seq, self.base_version, c)
            seq += 1
        if self.fd is None or not self.writable:
            raise OSError(errno.EROFS, f"{self.path}: the index folder is read-only")
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError:  # disk full, I/O error: nothing acknowledged, and no half record left for the next append
            os.ftruncate(self.fd, self.bytes)
            raise
        self.next_seq = seq
        self.bytes += len(blob)
        return seq - 1

    def close(self) -> None:
        for name in ("fd", "_dir"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


class LogBusy(RuntimeError):
    """Another process holds this index's compaction."""


class StaleFolder(RuntimeError):
    """The index folder's path holds another index than the one loaded (swapped in by a compaction meanwhile)."""


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _exists(dir_fd: int) -> bool:
    try:
        os.stat(LOG_NAME, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        part = os.pread(fd, n, offset)
        if not part:
            break
        parts.append(part)
        n -= len(part)
        offset += len(part)
    return b"".join(parts)
