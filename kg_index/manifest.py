"""The index manifest: what was built, from what, and the checksum of every file.

Loading verifies it before anything is served; any mismatch raises `IndexIntegrityError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class IndexIntegrityError(RuntimeError):
    """A broken, tampered or mismatched index. The message names the offending file."""


@dataclass
class Manifest:
    version: str  # e.g. 20261127T211500Z-1a2b3c4d
    built_at: str  # ISO 8601, UTC
    kg: str  # the KG spec it was built from ("mel" or a JSONL path)
    encoder: dict  # the EncoderSpec as a dict
    encoder_signature: str
    n_entities: int
    n_images: int
    global_dim: int
    local_dim: int
    max_tokens: int
    image_patches: int
    faiss_factory: str
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"sha256", "bytes"}
    format_version: int = FORMAT_VERSION
    heads: str = ""  # "" zero-shot features; "student@<digest>" the trained student's (EncoderSpec.heads)
    # Where the entities came from: KGSource.to_dict() (kg_index/source.py), with the kind, the resolved
    # location, each source file's size and hash, and the fingerprint. None in manifests written before
    # sources were recorded, and for indexes built from entities handed to build_index without one.
    source: dict | None = None
    # Folded from a live index's change log (kg_index/compact.py): {"from": the previous version, "changes": how
    # many changes it folded in, "at": when}; None for a build.
    compacted: dict | None = None

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise IndexIntegrityError(f"{path}: no manifest; build the index first (make index)")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise IndexIntegrityError(f"{path}: unreadable manifest ({exc.__class__.__name__})") from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def record_files(manifest: Manifest, folder: Path, names: list[str]) -> None:
    manifest.files = {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size} for n in names}


INDEX_FILES = ("faiss.index", "ids.json", "entities.jsonl", "projections.npz", "text_local.npy", "text_seg.npy",
               "image_rows.npy", "image_local.npy")
STUDENT_INDEX_FILES = ("faiss.index", "ids.json", "entities.jsonl", "unit_globals.npy", "image_blank.npy",
                       "text_local.npy", "text_seg.npy", "image_rows.npy", "image_local.npy")


def index_files(heads: str) -> tuple[str, ...]:
    """The files an index holds: zero-shot indexes keep fitted projections, student ones unit globals."""
    return STUDENT_INDEX_FILES if heads else INDEX_FILES


def verify_files(manifest: Manifest, folder: Path) -> None:
    """Every index file is listed, exists, and has the recorded size and checksum."""
    if manifest.format_version != FORMAT_VERSION:
        raise IndexIntegrityError(f"{folder / MANIFEST}: format {manifest.format_version}, expected {FORMAT_VERSION}")
    unlisted = [name for name in index_files(manifest.heads) if name not in manifest.files]
    if unlisted:
        raise IndexIntegrityError(f"{folder / MANIFEST}: no checksum for {', '.join(unlisted)}")
    for name, meta in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise IndexIntegrityError(f"{path}: missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise IndexIntegrityError(f"{path}: {size} bytes, manifest says {meta['bytes']} (truncated or replaced)")
        if sha256_file(path) != meta["sha256"]:
            raise IndexIntegrityError(f"{path}: checksum mismatch (corrupted or modified)")
