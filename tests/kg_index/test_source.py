"""The KG source an index records (kg_index/source.py): fingerprints notice changed, edited-in-place, added and
removed source files, ignore where an identical copy sits, and older manifests without a source still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kg_index import readers
from kg_index.manifest import Manifest
from kg_index.readers import mel_kb_sources, read_mel_kb
from kg_index.source import KGSource, check_source, kg_source
from tests.kg_index.test_readers import make_richpedia, make_wikidiverse, make_wikimel

ROWS = [{"id": "X1", "name": "Zorvathine Quellmarch", "description": "glass sculptor"},
        {"id": "X2", "name": "Ombrelt Tessavine", "description": "lighthouse keeper"}]


def _jsonl(path: Path, rows: list[dict] = ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def release(tmp_path: Path) -> Path:
    root = tmp_path / "mel"
    make_wikimel(root)
    make_richpedia(root)
    make_wikidiverse(root)
    return root


def test_unchanged_jsonl_matches(tmp_path: Path) -> None:
    kg = _jsonl(tmp_path / "my_kg.jsonl")
    built = kg_source(str(kg), tmp_path / "unused")
    assert built.kind == "jsonl" and built.location == str(kg.resolve())
    assert [(f.name, f.bytes) for f in built.files] == [("my_kg.jsonl", kg.stat().st_size)]
    assert check_source(built.to_dict(), str(kg), tmp_path / "unused", None).status == "match"


def test_jsonl_edited_in_place_with_the_same_size_is_noticed(tmp_path: Path) -> None:
    kg = _jsonl(tmp_path / "my_kg.jsonl")
    built = kg_source(str(kg), tmp_path)
    size = kg.stat().st_size
    kg.write_text(kg.read_text().replace("glass sculptor", "glass sculpted"))  # same length, new content
    assert kg.stat().st_size == size
    check = check_source(built.to_dict(), str(kg), tmp_path, None)
    assert check.status == "mismatch"
    assert check.message.endswith("my_kg.jsonl changed content (same size)")


def test_another_kg_is_a_mismatch_naming_both(tmp_path: Path, release: Path) -> None:
    kg = _jsonl(tmp_path / "my_kg.jsonl")
    built = kg_source("mel", release)
    check = check_source(built.to_dict(), str(kg), release, None)
    assert check.status == "mismatch"
    assert check.message == (f"built from the MEL KBs under {release} (fingerprint {built.fingerprint}), but the "
                             f"configured KG is {kg} (fingerprint {kg_source(str(kg), release).fingerprint}): "
                             "a mel KG, not a jsonl one")


def test_a_grown_jsonl_and_another_limit_are_mismatches(tmp_path: Path) -> None:
    kg = _jsonl(tmp_path / "kg.jsonl")
    built = kg_source(str(kg), tmp_path).to_dict()
    assert "entity limit None, not 1" in check_source(built, str(kg), tmp_path, 1).message
    _jsonl(kg, [*ROWS, {"id": "X3", "name": "Pellory Vance"}])
    check = check_source(built, str(kg), tmp_path, None)
    assert check.status == "mismatch" and "kg.jsonl is " in check.message and "bytes, was" in check.message


def test_unknown_when_nothing_is_recorded_or_the_source_is_gone(tmp_path: Path) -> None:
    kg = _jsonl(tmp_path / "kg.jsonl")
    unrecorded = check_source(None, str(kg), tmp_path, None)
    assert unrecorded.status == "unknown" and "records no KG source" in unrecorded.message
    built = kg_source(str(kg), tmp_path).to_dict()
    garbled = check_source({"kind": "jsonl"}, str(kg), tmp_path, None)
    assert garbled.status == "unknown" and "recorded KG source is unreadable (KeyError)" in garbled.message
    kg.unlink()
    gone = check_source(built, str(kg), tmp_path, None)
    assert gone.status == "unknown" and "cannot be read" in gone.message and str(kg) in gone.message


def test_mel_source_lists_exactly_what_read_mel_kb_reads(release: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    real = readers._load_json

    def recording(path: Path):
        opened.append(path)
        return real(path)

    monkeypatch.setattr(readers, "_load_json", recording)
    read_mel_kb(release)
    files, listed = mel_kb_sources(release)
    assert set(files) == set(opened)
    assert listed == [release / "RichpediaMEL" / "images"]


def test_mel_fingerprint_follows_content_not_location(release: Path, tmp_path: Path) -> None:
    built = kg_source("mel", release)
    copy = tmp_path / "elsewhere"
    shutil.copytree(release, copy)
    assert check_source(built.to_dict(), "mel", copy, None).status == "match"  # e.g. mounted elsewhere
    qid2ne = copy / "WikiMEL" / "qid2ne.json"
    qid2ne.write_text(json.dumps({**json.loads(qid2ne.read_text()), "Q999": "Added Entity"}))
    check = check_source(built.to_dict(), "mel", copy, None)
    assert check.status == "mismatch"
    assert str(release) in check.message and str(copy) in check.message
    assert check.message.endswith("bytes, was " + str((release / "WikiMEL" / "qid2ne.json").stat().st_size))


def test_mel_image_folder_listing_is_part_of_the_source(release: Path) -> None:
    built = kg_source("mel", release).to_dict()
    images = release / "RichpediaMEL" / "images"
    images.mkdir(parents=True, exist_ok=True)
    (images / "Q12345.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    check = check_source(built, "mel", release, None)
    assert check.status == "mismatch" and "RichpediaMEL/images/" in check.message


def test_source_round_trips_through_the_manifest(tmp_path: Path) -> None:
    kg = _jsonl(tmp_path / "kg.jsonl")
    src = kg_source(str(kg), tmp_path, 2)
    m = Manifest(version="v", built_at="t", kg=str(kg), encoder={}, encoder_signature="s", n_entities=2, n_images=0,
                 global_dim=4, local_dim=4, max_tokens=8, image_patches=1, faiss_factory="Flat", source=src.to_dict())
    m.write(tmp_path)
    back = Manifest.read(tmp_path)
    assert back.source is not None and back.source["fingerprint"] == src.fingerprint
    assert KGSource.from_dict(back.source) == src


def test_a_manifest_written_before_sources_were_recorded_still_loads(tmp_path: Path) -> None:
    old = {"version": "v", "built_at": "t", "kg": "mel", "encoder": {}, "encoder_signature": "s", "n_entities": 2,
           "n_images": 0, "global_dim": 4, "local_dim": 4, "max_tokens": 8, "image_patches": 1,
           "faiss_factory": "Flat", "files": {}, "format_version": 1, "heads": ""}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert Manifest.read(tmp_path).source is None
