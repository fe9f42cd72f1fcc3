"""Fixtures of the hardening tests: a second index over a disjoint slice of the real KG, a corrupted copy of
the small index, and a real image. Servers are started per module (tests/hardening/server.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def other_index(small_kg, mel_dir: Path, runtime, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second small index: 120 KB entities (no images, so it builds in seconds) none of which is in small_index."""
    from kg_index.build import build_index
    from kg_index.readers import read_mel_kb

    used = {e.id for e in small_kg}
    others = [e for e in read_mel_kb(mel_dir) if e.id not in used and e.image is None][:120]
    out = tmp_path_factory.mktemp("index") / "other"
    build_index(others, runtime, out, kg="mel-slice-other", progress=False)
    return out


@pytest.fixture(scope="session")
def corrupt_index(small_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of small_index with one byte flipped in text_local.npy (same size: only the checksum can tell)."""
    out = tmp_path_factory.mktemp("index") / "corrupt"
    shutil.copytree(small_index, out)
    path = out / "text_local.npy"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="session")
def q42_jpeg(mel_dir: Path) -> bytes:
    path = mel_dir / "RichpediaMEL" / "images" / "Q42.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path.read_bytes()

