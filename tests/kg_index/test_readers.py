"""KG and mention readers: tiny fixtures in each MEL release format, then checks on the real data."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kg_index.readers import (
    DATASETS,
    KGFormatError,
    kb_for_dataset,
    read_jsonl_kg,
    read_kg,
    read_mel_kb,
    read_mentions,
    richpedia_dev_ids,
)
from kg_index.records import Entity, Mention

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xd9")  # content is never decoded here


def make_wikimel(root: Path) -> None:
    d = root / "WikiMEL"
    samples = {
        "101": {
            "id": "101",
            "sentence": "Adams with Earth",
            "imgPath": "KVQAimgs/101.JPG",
            "mentions": ["Adams", "Earth"],
            "entities": ["Douglas Adams", "Earth"],
            "answer": ["Q42", "Q2"],
        },
        "102": {
            "id": "102",
            "sentence": "Obama in 2009",
            "imgPath": "KVQAimgs/102.jpg",
            "mentions": ["Obama"],
            "entities": ["Barack Obama"],
            "answer": ["Q76"],
        },
    }
    _write(d / "Wikidata-MEL.with_imgPath.BlueStragglers.json", samples)
    _write(d / "qid2ne.json", {"Q42": "Douglas Adams", "Q2": "Earth"})
    _write(d / "qid2abs.json", {"Q42": "Sex: male. Birth: 1952, Cambridge.", "Q2": "Planet."})
    _write(d / "splits.json", {"train": ["101"], "dev": [], "test": ["102", "999"]})
    _image(d / "images" / "101.JPG")


def make_richpedia(root: Path, n_train: int = 20) -> None:
    d = root / "RichpediaMEL"
    train = {
        f"Q{1000 + i}": {
            "id": f"Q{1000 + i}",
            "sentence": f"Person {i} was a poet.",
            "mentions": f"Person {i}",
            "entities": f"Person Number {i}",
            "answer": f"Q{1000 + i}",
        }
        for i in range(n_train)
    }
    _write(d / "train.json", train)
    qids = ["Q42", "Q2", "Q10", *train]
    names = {q: f"Person Number {int(q[1:]) - 1000}" for q in train} | {
        "Q42": "Douglas Noel Adams",
        "Q2": "",
        "Q10": "Ten",
    }
    _write(d / "qid2ne.json", names)
    _write(d / "ne2qid.json", {v: k for k, v in names.items() if v})
    _write(d / "qid2abs.json", {q: "Occupation: poet." for q in qids} | {"Q2": "Type: planet, the third from the Sun."})
    _write(d / "qid2abs_long.json", {q: "Sex: male. Occupation: poet, writer, and more." for q in qids})
    _write(d / "img_list.json", [f"raw_data/imgs/{q}.jpg" for q in qids])
    _write(d / "qids_ordered.json", qids)
    _image(d / "images" / "Q42.jpg")


def make_wikidiverse(root: Path) -> None:
    d = root / "WikiDiverse"
    samples = [
        {
            "id": 0,
            "sentence": "Students outside the UK parliament.",
            "imgPath": "mention_0.jpg",
            "mention": ["UK", "parliament"],
            "entity": ["United Kingdom", "Parliament of the United Kingdom"],
            "answer": ["Q145", "Q11010"],
            "img-url": "https://example.org/0.jpg",
        },
        {
            "id": 1,
            "sentence": "Map of Earth and a place.",
            "imgPath": "mention_1.jpg",
            "mention": ["Earth", "place"],
            "entity": ["Earth (planet)", "Somewhere"],
            "answer": ["Q2", None],
        },
    ]
    _write(d / "WikiDiverse.json", samples)
    _write(d / "splits.json", {"train": [0], "dev": [1]})
    _image(d / "images" / "mention_0.jpg")


@pytest.fixture
def release(tmp_path: Path) -> Path:
    make_wikimel(tmp_path)
    make_richpedia(tmp_path)
    make_wikidiverse(tmp_path)
    return tmp_path


def _by_id(entities: list[Entity]) -> dict[str, Entity]:
    return {e.id: e for e in entities}


# --------------------------------------------------------------------------- MEL KB


def test_kb_is_union_sorted_in_qid_order(release: Path) -> None:
    kb = read_mel_kb(release)
    ids = [e.id for e in kb]
    assert ids[:5] == ["Q2", "Q10", "Q42", "Q76", "Q145"]  # natural order, not "Q10" < "Q2"
    assert set(ids) == {"Q2", "Q10", "Q42", "Q76", "Q145", "Q11010", *(f"Q{1000 + i}" for i in range(20))}
    assert len(ids) == len(set(ids))
    assert kb_for_dataset(release) == kb


def test_kb_merge_rules(release: Path) -> None:
    kb = _by_id(read_mel_kb(release))
    # name: WikiMEL first; description: the longest text whichever KB holds it
    assert kb["Q42"].name == "Douglas Adams"
    assert kb["Q42"].description == "Sex: male. Birth: 1952, Cambridge."
    assert kb["Q2"].name == "Earth"
    assert kb["Q2"].description == "Type: planet, the third from the Sun."
    assert kb["Q10"] == Entity("Q10", "Ten", "Occupation: poet.", None)
    # answer QIDs in no KB file: named as annotated, no attributes
    assert kb["Q76"] == Entity("Q76", "Barack Obama", "", None)
    assert kb["Q145"] == Entity("Q145", "United Kingdom", "", None)


def test_kb_entity_images_come_from_richpedia_images_folder(release: Path) -> None:
    kb = _by_id(read_mel_kb(release))
    assert kb["Q42"].image == release / "RichpediaMEL" / "images" / "Q42.jpg"
    assert kb["Q10"].image is None  # listed in img_list.json, no local file
    assert kb["Q76"].image is None  # WikiMEL images are mention images


def test_kb_long_attributes(release: Path) -> None:
    kb = _by_id(read_mel_kb(release, long_attributes=True))
    assert kb["Q10"].description == "Sex: male. Occupation: poet, writer, and more."
    assert kb["Q42"].description == "Sex: male. Occupation: poet, writer, and more."  # now the longest


def test_kb_skips_missing_dataset_folder_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_wikidiverse(tmp_path)
    with caplog.at_level(logging.WARNING, logger="kg_index.readers"):
        kb = read_mel_kb(tmp_path)
    assert [e.id for e in kb] == ["Q2", "Q145", "Q11010"]
    assert _by_id(kb)["Q2"].name == "Earth (planet)"
    assert "WikiMEL" in caplog.text and "RichpediaMEL" in caplog.text


def test_kb_without_any_dataset_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download") as err:
        read_mel_kb(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


# --------------------------------------------------------------------------- mentions


def test_wikimel_mentions(release: Path) -> None:
    train = read_mentions(release, "wikimel", "train")
    image = release / "WikiMEL" / "images" / "101.JPG"
    assert train == [
        Mention("wikimel:101:0", "Adams", "Adams with Earth", image, "Q42", "Douglas Adams"),
        Mention("wikimel:101:1", "Earth", "Adams with Earth", image, "Q2", "Earth"),
    ]
    test = read_mentions(release, "wikimel", "test")  # split id 999 has no sample
    assert test == [Mention("wikimel:102:0", "Obama", "Obama in 2009", None, "Q76", "Barack Obama")]
    assert read_mentions(release, "wikimel", "dev") == []


def test_wikimel_image_falls_back_to_sample_id_jpg(release: Path) -> None:
    _image(release / "WikiMEL" / "images" / "102.jpg")
    (mention,) = read_mentions(release, "wikimel", "test")
    assert mention.image == release / "WikiMEL" / "images" / "102.jpg"


def test_richpedia_dev_slice_is_fixed_and_disjoint(release: Path) -> None:
    train = read_mentions(release, "richpedia", "train")
    dev = read_mentions(release, "richpedia", "dev")
    assert len(dev) == 2 and len(train) == 18  # 10 % of 20 samples
    assert {m.answer for m in train}.isdisjoint(m.answer for m in dev)
    assert read_mentions(release, "richpedia", "dev") == dev
    ids = [f"Q{1000 + i}" for i in range(20)]
    assert richpedia_dev_ids(ids) == richpedia_dev_ids(reversed(ids)) == {m.answer for m in dev}
    m = dev[0]
    n = int(m.answer[1:]) - 1000
    assert m == Mention(
        f"richpedia:{m.answer}:0", f"Person {n}", f"Person {n} was a poet.", None, m.answer, f"Person Number {n}"
    )


def test_richpedia_test_split(release: Path) -> None:
    with pytest.raises(FileNotFoundError, match="test.json"):
        read_mentions(release, "richpedia", "test")
    _write(
        release / "RichpediaMEL" / "test.json",
        {"Q7": {"id": "Q7", "sentence": "Seven.", "mentions": "7", "entities": "Seven", "answer": "Q7"}},
    )
    assert read_mentions(release, "richpedia", "test") == [
        Mention("richpedia:Q7:0", "7", "Seven.", None, "Q7", "Seven")
    ]
    assert _by_id(read_mel_kb(release))["Q7"].name == "Seven"  # test annotations join the KB


def test_wikidiverse_mentions(release: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = release / "WikiDiverse" / "images" / "mention_0.jpg"
    assert read_mentions(release, "wikidiverse", "train") == [
        Mention("wikidiverse:0:0", "UK", "Students outside the UK parliament.", image, "Q145", "United Kingdom"),
        Mention(
            "wikidiverse:0:1",
            "parliament",
            "Students outside the UK parliament.",
            image,
            "Q11010",
            "Parliament of the United Kingdom",
        ),
    ]
    with caplog.at_level(logging.WARNING, logger="kg_index.readers"):
        dev = read_mentions(release, "wikidiverse", "dev")
    assert dev == [Mention("wikidiverse:1:0", "Earth", "Map of Earth and a place.", None, "Q2", "Earth (planet)")]
    assert "1 mentions have no answer" in caplog.text


def test_wikidiverse_test_split(release: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        read_mentions(release, "wikidiverse", "test")
    _write(release / "WikiDiverse" / "splits.json", {"train": [0], "dev": [], "test": [1]})
    assert [m.id for m in read_mentions(release, "wikidiverse", "test")] == ["wikidiverse:1:0"]


def test_unknown_dataset_or_split(release: Path) -> None:
    with pytest.raises(ValueError, match="wikimel, richpedia, wikidiverse"):
        read_mentions(release, "nope", "train")
    with pytest.raises(ValueError, match="train, dev, test"):
        read_mentions(release, "wikimel", "validation")


def test_missing_dataset_folder_for_mentions(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="WikiMEL"):
        read_mentions(tmp_path, "wikimel", "test")


# --------------------------------------------------------------------------- JSONL KG


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_kg(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "kg").mkdir()
    _image(tmp_path / "kg" / "imgs" / "a.jpg")
    absolute = tmp_path / "abs.png"
    _image(absolute)
    path = _jsonl(
        tmp_path / "kg" / "kg.jsonl",
        [
            json.dumps({"id": "E2", "name": "Bravo", "description": "second", "image": "imgs/a.jpg"}),
            "",
            json.dumps({"id": "E1", "name": "Alpha"}),
            "   ",
            json.dumps({"id": "E3", "name": "Charlie", "image": "imgs/missing.jpg"}),
            json.dumps({"id": "E4", "name": "Delta", "image": str(absolute), "description": None}),
            json.dumps({"id": "E5", "name": "Echo", "image": "imgs/gone.jpg", "start_year": -44, "end_year": None}),
            json.dumps({"id": "E6", "name": "Foxtrot", "start_year": 1950, "end_year": 2001}),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="kg_index.readers"):
        kg = read_jsonl_kg(path)
    assert kg == [
        Entity("E2", "Bravo", "second", tmp_path / "kg" / "imgs" / "a.jpg"),
        Entity("E1", "Alpha", "", None),
        Entity("E3", "Charlie", "", None),
        Entity("E4", "Delta", "", absolute),
        Entity("E5", "Echo", "", None, start_year=-44),
        Entity("E6", "Foxtrot", "", None, start_year=1950, end_year=2001),
    ]
    warnings = [r for r in caplog.records if "image files do not exist" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 6" in warnings[0].getMessage()
    assert not [r for r in caplog.records if "unknown keys" in r.getMessage()]
    assert read_kg(str(path), tmp_path / "unused") == kg


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"id": "E9", "name": ', "invalid JSON"),
        ('["E9", "Nine"]', "expected a JSON object"),
        ('{"id": "E9"}', "'name' must be a non-empty string"),
        ('{"id": 9, "name": "Nine"}', "'id' must be a non-empty string"),
        ('{"id": "E9", "name": "Nine", "description": 3}', "'description' must be a string"),
        ('{"id": "E9", "name": "Nine", "image": 3}', "'image' must be a string"),
        ('{"id": "E1", "name": "Again"}', "duplicate id 'E1' \\(first on line 1\\)"),
        ('{"id": "E9", "name": "Nine", "start_year": "1950"}', "'start_year' must be a year"),
        ('{"id": "E9", "name": "Nine", "end_year": true}', "'end_year' must be a year"),
        ('{"id": "E9", "name": "Nine", "start_year": 1990, "end_year": 1950}', "'end_year' 1950 is before"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = _jsonl(tmp_path / "kg.jsonl", ['{"id": "E1", "name": "One"}', "", bad_line])
    with pytest.raises(KGFormatError, match=reason) as err:
        read_jsonl_kg(path)
    assert f"{path}, line 3" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_jsonl_not_utf8_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "kg.jsonl"
    path.write_bytes(b'{"id": "E1", "name": "One"}\n{"id": "E2", "name": "\xff"}\n')
    with pytest.raises(KGFormatError, match="line 2: not UTF-8"):
        read_jsonl_kg(path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(KGFormatError, match="no entities"):
        read_jsonl_kg(path)


def test_read_kg_dispatch(release: Path, tmp_path: Path) -> None:
    assert read_kg("mel", release) == read_mel_kb(release)
    with pytest.raises(ValueError, match="'mel' or the path of a .jsonl file"):
        read_kg(str(tmp_path / "kg.csv"), release)
    with pytest.raises(FileNotFoundError):
        read_kg(str(tmp_path / "absent.jsonl"), release)


def test_import_has_no_side_effects_and_no_service_import() -> None:
    code = "import sys, kg_index.readers, kg_index.records; sys.exit(any(m.split('.')[0] == 'service' for m in sys.modules))"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------- real benchmark data

DATA_DIR = Path(os.environ.get("EL_DATA_DIR") or REPO.parent / "shared" / "data" / "mel")
real_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"MEL data not found at {DATA_DIR} (set EL_DATA_DIR)")


@pytest.fixture(scope="module")
def real_kb() -> list[Entity]:
    return read_mel_kb(DATA_DIR)


@real_data
def test_real_kb_size(real_kb: list[Entity]) -> None:
    # WikiMEL KB 18,880 + RichpediaMEL KB 17,805 (2,023 shared) + 6,280 QIDs only in WikiDiverse annotations
    assert len(real_kb) == 40_942
    assert len({e.id for e in real_kb}) == 40_942
    assert all(e.name for e in real_kb)


@real_data
def test_real_wikimel_test_answers_in_kb(real_kb: list[Entity]) -> None:
    mentions = read_mentions(DATA_DIR, "wikimel", "test")
    assert len(mentions) == 5_131
    assert len({m.id for m in mentions}) == 5_131
    ids = {e.id for e in real_kb}
    assert all(m.answer in ids for m in mentions)


@real_data
@pytest.mark.parametrize("dataset", DATASETS)
def test_real_train_dev_counts(dataset: str) -> None:
    expected = {"wikimel": (18_088, 2_627), "richpedia": (12_820, 1_424), "wikidiverse": (11_173, 1_656)}[dataset]
    assert (len(read_mentions(DATA_DIR, dataset, "train")), len(read_mentions(DATA_DIR, dataset, "dev"))) == expected
