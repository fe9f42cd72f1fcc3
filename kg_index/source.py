"""Where an index's entities came from: the KG source and a content fingerprint of the files it was read from.

The build records the source in the manifest; `el build-index --if-missing` rebuilds, and the service refuses
to serve, when the configured source (EL_INDEX__KG, EL_DATA_DIR, EL_INDEX__LIMIT) no longer matches it.

The fingerprint hashes every source file in full (blake2b): the MEL KB and annotation files are about 18 MB,
which hash in 0.03 s (page cache warm, 2-core dev machine), and a full hash is the only cheap check that
notices an in-place edit that keeps the file's size. Image folders are fingerprinted by
their listing (names and sizes), not their pixels; the images a JSONL KG names are not fingerprinted.

Two sources match when they have the same kind, the same files by name (relative to the data folder, or the
JSONL file's name) with the same sizes and hashes, and the same entity limit. Where the files sit is recorded
for messages but not compared, so a copy of the same data mounted elsewhere (a container) still matches.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from kg_index.readers import mel_kb_sources

CHUNK = 1 << 20  # hash in 1 MiB blocks: constant memory whatever the file size


@dataclass(frozen=True)
class SourceFile:
    name: str  # relative to the data folder ("WikiMEL/qid2ne.json"), or the JSONL file's name
    path: str  # resolved at build time; for messages only
    bytes: int  # file size; for an image folder, the size of its listing text
    blake2b: str  # of the content; for an image folder, of its listing (name and size per file)


@dataclass(frozen=True)
class KGSource:
    kind: Literal["mel", "jsonl"]
    kg: str  # as configured (EL_INDEX__KG)
    location: str  # resolved: the MEL data folder or the JSONL file
    files: tuple[SourceFile, ...]
    limit: int | None = None  # EL_INDEX__LIMIT: only the first N entities were indexed

    @property
    def fingerprint(self) -> str:
        content = [self.kind, self.limit, [(f.name, f.bytes, f.blake2b) for f in self.files]]
        return hashlib.blake2b(json.dumps(content).encode(), digest_size=8).hexdigest()

    def describe(self) -> str:
        what = f"the MEL KBs under {self.location}" if self.kind == "mel" else self.location
        limit = f", first {self.limit} entities" if self.limit else ""
        return f"{what} (fingerprint {self.fingerprint}{limit})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> KGSource:
        files = tuple(SourceFile(**f) for f in raw["files"])
        return cls(kind=raw["kind"], kg=raw["kg"], location=raw["location"], files=files, limit=raw.get("limit"))


def blake2b_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _file(path: Path, name: str) -> SourceFile:
    return SourceFile(name=name, path=str(path.resolve()), bytes=path.stat().st_size, blake2b=blake2b_file(path))


def _listing(folder: Path, name: str) -> SourceFile:
    try:
        with os.scandir(folder) as it:
            rows = sorted(f"{e.name}\t{e.stat().st_size}" for e in it if e.is_file())
    except FileNotFoundError:  # read_mel_kb treats a missing image folder as no images
        rows = []
    text = "\n".join(rows).encode()
    return SourceFile(name=name + "/", path=str(folder.resolve()), bytes=len(text),
                      blake2b=hashlib.blake2b(text, digest_size=16).hexdigest())


def kg_source(kg: str, data_dir: Path, limit: int | None = None) -> KGSource:
    """The configured source as it is on disk now. Raises FileNotFoundError when a source file is missing and
    ValueError for a KG spec that read_kg would refuse."""
    if kg == "mel":
        root = Path(data_dir).resolve()
        files, listed = mel_kb_sources(root)
        entries = [_file(p, p.relative_to(root).as_posix()) for p in files]
        entries += [_listing(p, p.relative_to(root).as_posix()) for p in listed]
        return KGSource("mel", kg, str(root), tuple(entries), limit)
    path = Path(kg)
    if path.suffix != ".jsonl":
        raise ValueError(f"unknown KG {kg!r}: expected 'mel' or the path of a .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (EL_INDEX__KG)")
    return KGSource("jsonl", kg, str(path.resolve()), (_file(path, path.name),), limit)


def difference(built: KGSource, configured: KGSource) -> str:
    """What differs between two sources, in a few words (the first difference found)."""
    if built.kind != configured.kind:
        return f"a {built.kind} KG, not a {configured.kind} one"
    if built.limit != configured.limit:
        return f"entity limit {built.limit}, not {configured.limit}"
    old, new = {f.name: f for f in built.files}, {f.name: f for f in configured.files}
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            return f"{name} is no longer in the source"
        if name not in old:
            return f"{name} was not in the source"
        if old[name].bytes != new[name].bytes:
            return f"{name} is {new[name].bytes} bytes, was {old[name].bytes}"
        if old[name].blake2b != new[name].blake2b:
            return f"{name} changed content (same size)"
    return "same content"


@dataclass(frozen=True)
class SourceCheck:
    """Whether an index was built from the configured KG. `message` says why not, naming both sources."""

    status: Literal["match", "mismatch", "unknown"]
    message: str = ""


def check_source(recorded: dict[str, Any] | None, kg: str, data_dir: Path, limit: int | None) -> SourceCheck:
    """Compare a manifest's recorded source with the configured one as it is on disk now.

    "unknown": the manifest records no source (built before sources were recorded, or by build_index without
    one) or the configured source cannot be read, so nothing can be compared.
    """
    if recorded is None:
        return SourceCheck("unknown", f"the index records no KG source (built before sources were recorded); "
                                      f"it cannot be checked against the configured KG {kg!r}")
    try:
        built = KGSource.from_dict(recorded)
    except (KeyError, TypeError, ValueError) as exc:  # a hand-edited manifest: nothing to compare against
        return SourceCheck("unknown", f"the index's recorded KG source is unreadable ({exc.__class__.__name__}); "
                                      f"it cannot be checked against the configured KG {kg!r}")
    try:
        configured = kg_source(kg, data_dir, limit)
    except (OSError, ValueError) as exc:
        return SourceCheck("unknown", f"the configured KG {kg!r} cannot be read ({exc}); the index was built from "
                                      f"{built.describe()}")
    if configured.fingerprint == built.fingerprint:
        return SourceCheck("match")
    return SourceCheck("mismatch", f"built from {built.describe()}, but the configured KG is "
                                   f"{configured.describe()}: {difference(built, configured)}")
