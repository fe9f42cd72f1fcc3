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
folder, whose log starts empty.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

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


def read_log(folder: Path, base_version: str, *, repair: bool = True, offset: int = 0,
             first_seq: int = 1) -> list[Change]:
    """Every change recorded for the index at folder (built as base_version), in order, from byte `offset` (where
    record `first_seq` starts). A torn last record is dropped (and, with repair, cut from the file); anything else
    wrong raises IndexIntegrityError."""
    path = folder / LOG_NAME
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    changes: list[Change] = []
    pos = 0
    while pos < len(data):
        torn = f"{path}: record {first_seq + len(changes)} at byte {offset + pos}"
        if len(data) - pos < _HEAD.size:
            return _torn(path, offset + pos, len(data) - pos, changes, torn + " is cut short", repair)
        magic, hlen, plen, digest = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + hlen + plen
        if magic != MAGIC:
            raise IndexIntegrityError(f"{torn}: bad record marker (corrupted)")
        if end > len(data):
            return _torn(path, offset + pos, len(data) - pos, changes, torn + " is cut short", repair)
        body = data[pos + _HEAD.size : end]
        if hashlib.sha256(body).digest() != digest:
            if end == len(data):  # the last record, written but not wholly on disk: never acknowledged
                return _torn(path, offset + pos, len(data) - pos, changes, torn + " fails its checksum", repair)
            raise IndexIntegrityError(f"{torn}: checksum mismatch (corrupted or modified)")
        try:
            header, change = decode_header(body[:hlen], body[hlen:])
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexIntegrityError(f"{torn}: unreadable ({exc.__class__.__name__})") from exc
        if header["base"] != base_version:
            raise IndexIntegrityError(f"{torn}: belongs to index {header['base']}, the folder holds {base_version}")
        if header["seq"] != first_seq + len(changes):
            raise IndexIntegrityError(f"{torn}: sequence {header['seq']}, expected {first_seq + len(changes)}")
        changes.append(change)
        pos = end
    return changes


def _torn(path: Path, pos: int, left: int, changes: list[Change], why: str, repair: bool) -> list[Change]:
    logger.warning("%s: dropping the unfinished last record (%d bytes; it was never acknowledged)", why, left)
    if repair:
        with path.open("r+b") as f:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
    return changes


class ChangeLog:
    """The log of one index folder: appends records durably. The file is created, and an exclusive lock on it
    taken, at the first append: several processes may serve one folder read-only, only one may change it."""

    def __init__(self, folder: Path, base_version: str, next_seq: int) -> None:
        self.folder = folder
        self.path = folder / LOG_NAME
        self.base_version = base_version
        self.next_seq = next_seq
        self.bytes = self.path.stat().st_size if self.path.exists() else 0
        self._f: BinaryIO | None = None

    def _open(self) -> BinaryIO:
        if self._f is None:
            created = not self.path.exists()
            f = self.path.open("ab")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise LogBusy(f"{self.path}: held by another process serving this index folder") from None
            if f.tell() != self.bytes:  # someone else wrote since we read it: our view is stale
                f.close()
                raise LogBusy(f"{self.path}: changed by another process since this one read it; restart to replay")
            if created:  # the new directory entry must survive a crash too
                _fsync_dir(self.folder)
            self._f = f
        return self._f

    def append(self, changes: Iterable[Change]) -> int:
        """Write the changes, fsync, return the sequence number of the last one. Only then may they be applied."""
        blob = bytearray()
        seq = self.next_seq
        for c in changes:
            blob += encode_record(seq, self.base_version, c)
            seq += 1
        f = self._open()
        try:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        except OSError:  # disk full, I/O error: nothing acknowledged, and no half record left for the next append
            f.truncate(self.bytes)
            raise
        self.next_seq = seq
        self.bytes += len(blob)
        return seq - 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class LogBusy(RuntimeError):
    """Another process holds (or has changed) this folder's change log."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
