"""Readers for the KGs and annotated mentions the service links against.

Two KG sources:
- "mel": the union of the three MEL benchmark KBs under `data_dir` (the release files, read as they are;
  layout in the data folder's README.md), plus every gold entity the annotations name;
- a JSONL file: the users' own KG, one `{"id", "name", "description"?, "image"?}` object per line.

`read_mentions` reads the annotated mentions of one benchmark split for training and evaluation.
Nothing here reads a file at import time.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from kg_index.records import Entity, Mention

logger = logging.getLogger(__name__)

DATASETS = ("wikimel", "richpedia", "wikidiverse")
SPLITS = ("train", "dev", "test")

# Dataset folders under data_dir, in the priority order of the KB merge.
DATASET_DIRS = {"wikimel": "WikiMEL", "richpedia": "RichpediaMEL", "wikidiverse": "WikiDiverse"}
# Both WikiMEL annotation files hold the same samples; the BlueStragglers copy adds `imgPath`.
WIKIMEL_ANNOTATION_FILES = ("Wikidata-MEL.with_imgPath.BlueStragglers.json", "Wikidata-MEL.MELBench.json")
# RichpediaMEL ships no dev split: dev is a fixed 10 % of the train.json sample ids (sorted, then shuffled
# with random.Random(0)); train is the rest. Changing either constant changes both splits.
RICHPEDIA_DEV_FRACTION = 0.1
RICHPEDIA_DEV_SEED = 0

_DOWNLOAD_HINT = (
    "set EL_DATA_DIR to the MEL benchmark folder or download the data (see the download section of README.md)"
)
_QID_RE = re.compile(r"([A-Za-z]*)(\d+)")
# (sample id, sample) -> the sample's local image file, or None
_ImageOf = Callable[[str, dict[str, Any]], Path | None]


class KGFormatError(ValueError):
    """A KG or annotation file that does not follow its format; the message names the file (and line)."""


def entity_sort_key(entity_id: str) -> tuple[str, int, str]:
    """Natural order: Q2 < Q10 < Q100; ids that are not letters+digits sort by their text."""
    m = _QID_RE.fullmatch(entity_id)
    return (m[1], int(m[2]), entity_id) if m else (entity_id, -1, entity_id)


# --------------------------------------------------------------------------- helpers


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {_DOWNLOAD_HINT}")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _file_names(folder: Path) -> frozenset[str]:
    """Names of the regular files in `folder` (empty when it is missing): one listing instead of a stat per id."""
    try:
        with os.scandir(folder) as it:
            return frozenset(e.name for e in it if e.is_file())
    except FileNotFoundError:
        return frozenset()


def _as_list(value: Any) -> list[Any]:
    # RichpediaMEL stores one mention per sample as plain strings; the others use lists.
    return value if isinstance(value, list) else [value]


def _triples(sample: dict[str, Any], mention_key: str, name_key: str, where: str) -> list[tuple[str, str, str | None]]:
    """(mention, answer_name, answer) for each mention of one annotated sample."""
    mentions = _as_list(sample.get(mention_key))
    names = _as_list(sample.get(name_key))
    answers = _as_list(sample.get("answer"))
    if not len(mentions) == len(names) == len(answers):
        raise KGFormatError(
            f"{where}: {len(mentions)} {mention_key}, {len(names)} {name_key} and {len(answers)} answer values differ"
        )
    return [(str(m or ""), str(n or ""), str(a) if a else None) for m, n, a in zip(mentions, names, answers)]


def _dataset_folder(data_dir: Path, dataset: str) -> Path:
    folder = data_dir / DATASET_DIRS[dataset]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found ({dataset} data); {_DOWNLOAD_HINT}")
    return folder


# --------------------------------------------------------------------------- release formats


def _wikimel_samples(folder: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """WikiMEL `{id: {id, sentence, mentions[], entities[], answer[], imgPath?}}` from the first file present."""
    for name in WIKIMEL_ANNOTATION_FILES:
        if (folder / name).is_file():
            return folder / name, _load_json(folder / name)
    raise FileNotFoundError(f"none of {WIKIMEL_ANNOTATION_FILES} in {folder}; {_DOWNLOAD_HINT}")


def _richpedia_files(folder: Path) -> list[Path]:
    """RichpediaMEL annotation files present: train.json and the held-back test.json."""
    return [p for p in (folder / "train.json", folder / "test.json") if p.is_file()]


def _wikidiverse_samples(folder: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """WikiDiverse `[{id, sentence, imgPath, mention[], entity[], answer[]}]`, keyed by str(id)."""
    path = folder / "WikiDiverse.json"
    samples: dict[str, dict[str, Any]] = {}
    for sample in _load_json(path):
        samples[str(sample["id"])] = sample
    return path, samples


def _annotated_answers(data_dir: Path, present: list[str]) -> Iterator[tuple[str, str]]:
    """(answer QID, annotated name) over every annotation of every split, in file order."""
    for dataset in present:
        folder = data_dir / DATASET_DIRS[dataset]
        if dataset == "wikimel":
            path, samples = _wikimel_samples(folder)
            sources = [(path, samples, "mentions", "entities")]
        elif dataset == "richpedia":
            sources = [(p, _load_json(p), "mentions", "entities") for p in _richpedia_files(folder)]
        else:
            path, samples = _wikidiverse_samples(folder)
            sources = [(path, samples, "mention", "entity")]
        for path, samples, mention_key, name_key in sources:
            for sid, sample in samples.items():
                for _, name, answer in _triples(sample, mention_key, name_key, f"{path} sample {sid}"):
                    if answer:
                        yield answer, name


# --------------------------------------------------------------------------- KGs


def read_mel_kb(data_dir: Path, long_attributes: bool = False) -> list[Entity]:
    """The union of the WikiMEL, RichpediaMEL and WikiDiverse KBs under `data_dir`, sorted by QID.

    Sources: WikiMEL qid2ne/qid2abs; RichpediaMEL qid2ne plus qid2abs (short attributes, the default) or
    qid2abs_long; WikiDiverse has no KB file, so its entities come from the annotations (name only). Every
    answer QID of any annotation file (all splits) is included, named as annotated.

    Merge rules for a QID found in several sources:
    - name: the first non-empty of WikiMEL qid2ne, RichpediaMEL qid2ne, then the first annotated name
      (annotations read in WikiMEL, RichpediaMEL, WikiDiverse file order); the id itself if all are empty;
    - description: the longest non-empty attribute text (ties go to WikiMEL), so an entity keeps the
      most informative text whichever KB holds it;
    - image: RichpediaMEL/images/<QID>.jpg when that file exists (WikiMEL images show mentions, not entities).

    Short RichpediaMEL attributes are the default: they average about 53 characters against about 190 for
    the long ones (up to 2,000), so "name [SEP] attributes" fits the encoder's 40-token budget instead of
    being cut at an arbitrary attribute. The cost: about 180 entities have an empty short text (176 of them
    end with no description). `long_attributes=True` reads qid2abs_long.json instead.
    """
    data_dir = Path(data_dir)
    present = [ds for ds in DATASETS if (data_dir / DATASET_DIRS[ds]).is_dir()]
    if not present:
        raise FileNotFoundError(
            f"no MEL dataset folder ({', '.join(DATASET_DIRS.values())}) under {data_dir}; {_DOWNLOAD_HINT}"
        )
    for ds in DATASETS:
        if ds not in present:
            logger.warning("%s not found: the MEL KB is read without %s", data_dir / DATASET_DIRS[ds], ds)

    kb_names: list[dict[str, str]] = []  # per KB file, in name priority order
    kb_descriptions: list[dict[str, str]] = []  # ties of the longest-description rule go to the earlier one
    images: dict[str, Path] = {}
    if "wikimel" in present:
        folder = data_dir / DATASET_DIRS["wikimel"]
        kb_names.append(_load_json(folder / "qid2ne.json"))
        kb_descriptions.append(_load_json(folder / "qid2abs.json"))
    if "richpedia" in present:
        folder = data_dir / DATASET_DIRS["richpedia"]
        kb_names.append(_load_json(folder / "qid2ne.json"))
        kb_descriptions.append(_load_json(folder / ("qid2abs_long.json" if long_attributes else "qid2abs.json")))
        images = _richpedia_images(folder, kb_names[-1])

    annotated: dict[str, str] = {}
    for qid, name in _annotated_answers(data_dir, present):
        if name and not annotated.get(qid):
            annotated[qid] = name
        else:
            annotated.setdefault(qid, "")

    kb_ids = set().union(*kb_names, *kb_descriptions)
    ids = sorted(kb_ids.union(annotated), key=entity_sort_key)
    entities: list[Entity] = []
    unnamed = 0
    for qid in ids:
        name = next((str(n) for d in kb_names if (n := d.get(qid))), "") or annotated.get(qid, "")
        if not name:
            name, unnamed = qid, unnamed + 1
        texts = [str(t) for d in kb_descriptions if (t := d.get(qid))]
        description = max(texts, key=len) if texts else ""
        entities.append(Entity(id=qid, name=name, description=description, image=images.get(qid)))
    if unnamed:
        logger.warning("%d MEL entities have no name in any source; their id is used as the name", unnamed)
    logger.info(
        "MEL KB under %s: %d entities (%d from KB files, %d only from annotations, %d with an image)",
        data_dir,
        len(entities),
        len(kb_ids),
        len(ids) - len(kb_ids),
        len(images),
    )
    return entities


def mel_kb_sources(data_dir: Path, long_attributes: bool = False) -> tuple[list[Path], list[Path]]:
    """What `read_mel_kb` reads under `data_dir`: (the KB and annotation files, the image folders it lists).

    Kept beside read_mel_kb so that the two change together: the index manifest fingerprints exactly these
    (kg_index/source.py). Raises FileNotFoundError as read_mel_kb would.
    """
    data_dir = Path(data_dir)
    present = [ds for ds in DATASETS if (data_dir / DATASET_DIRS[ds]).is_dir()]
    if not present:
        raise FileNotFoundError(
            f"no MEL dataset folder ({', '.join(DATASET_DIRS.values())}) under {data_dir}; {_DOWNLOAD_HINT}"
        )
    files: list[Path] = []
    listed: list[Path] = []
    if "wikimel" in present:
        folder = data_dir / DATASET_DIRS["wikimel"]
        annotations = next((folder / n for n in WIKIMEL_ANNOTATION_FILES if (folder / n).is_file()), None)
        if annotations is None:
            raise FileNotFoundError(f"none of {WIKIMEL_ANNOTATION_FILES} in {folder}; {_DOWNLOAD_HINT}")
        files += [folder / "qid2ne.json", folder / "qid2abs.json", annotations]
    if "richpedia" in present:
        folder = data_dir / DATASET_DIRS["richpedia"]
        files += [folder / "qid2ne.json", folder / ("qid2abs_long.json" if long_attributes else "qid2abs.json")]
        files += [p for p in (folder / "img_list.json",) if p.is_file()] + _richpedia_files(folder)
        listed.append(folder / "images")
    if "wikidiverse" in present:
        files.append(data_dir / DATASET_DIRS["wikidiverse"] / "WikiDiverse.json")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; {_DOWNLOAD_HINT}")
    return files, listed


def _richpedia_images(folder: Path, qid2ne: dict[str, str]) -> dict[str, Path]:
    """QID -> local entity image. img_list.json names raw_data/imgs/<QID>.jpg; the local copies sit in images/."""
    img_list = folder / "img_list.json"
    rel_paths = _load_json(img_list) if img_list.is_file() else [f"{qid}.jpg" for qid in qid2ne]
    local = _file_names(folder / "images")
    images: dict[str, Path] = {}
    for rel in rel_paths:
        name = PurePosixPath(rel).name
        if name in local:
            images[PurePosixPath(name).stem] = folder / "images" / name
    return images


_YEAR_KEYS = ("start_year", "end_year")  # an entity's lifespan, optional in a JSONL KG


def read_jsonl_kg(path: Path) -> list[Entity]:
    """A user KG: one JSON object per line, `{"id", "name", "description"?, "image"?, "start_year"?,
    "end_year"?}`, in file order.

    Blank lines are skipped; relative image paths are resolved against the file's folder; an image that
    does not exist leaves `image=None` (one warning with the count). A malformed line or a duplicate id
    raises KGFormatError naming the file and line.
    """
    path = Path(path)
    entities: list[Entity] = []
    first_line: dict[str, int] = {}
    missing_images: list[str] = []
    unknown_keys: set[str] = set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise KGFormatError(f"{where}: not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise KGFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            entity = _jsonl_entity(obj, path.parent, where, missing_images)
            if entity.id in first_line:
                raise KGFormatError(f"{where}: duplicate id {entity.id!r} (first on line {first_line[entity.id]})")
            first_line[entity.id] = lineno
            unknown_keys.update(set(obj) - {"id", "name", "description", "image", *_YEAR_KEYS})
            entities.append(entity)
    if not entities:
        raise KGFormatError(f"{path}: no entities")
    if unknown_keys:
        logger.warning("%s: ignored unknown keys %s", path, sorted(unknown_keys))
    if missing_images:
        logger.warning(
            "%s: %d of %d image files do not exist (first: %s); those entities have no image",
            path,
            len(missing_images),
            len(entities),
            missing_images[0],
        )
    return entities


def _jsonl_entity(obj: Any, base: Path, where: str, missing_images: list[str]) -> Entity:
    if not isinstance(obj, dict):
        raise KGFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    entity_id, name = obj.get("id"), obj.get("name")
    if not isinstance(entity_id, str) or not entity_id.strip():
        raise KGFormatError(f"{where}: 'id' must be a non-empty string, got {entity_id!r}")
    if not isinstance(name, str) or not name.strip():
        raise KGFormatError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    description = obj.get("description") or ""
    if not isinstance(description, str):
        raise KGFormatError(f"{where}: 'description' must be a string, got {type(description).__name__}")
    image_value = obj.get("image")
    image: Path | None = None
    if image_value is not None:
        if not isinstance(image_value, str):
            raise KGFormatError(f"{where}: 'image' must be a string path, got {type(image_value).__name__}")
        if image_value:
            candidate = base / image_value  # an absolute image path stays as it is
            if candidate.is_file():
                image = candidate
            else:
                missing_images.append(str(candidate))
    start_year, end_year = (_year(obj, key, where) for key in _YEAR_KEYS)
    if start_year is not None and end_year is not None and end_year < start_year:
        raise KGFormatError(f"{where}: 'end_year' {end_year} is before 'start_year' {start_year}")
    return Entity(id=entity_id, name=name, description=description, image=image, start_year=start_year,
                  end_year=end_year)


def _year(obj: dict, key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not -9999 <= value <= 9999):
        raise KGFormatError(f"{where}: {key!r} must be a year (an integer), got {value!r}")
    return value


def read_kg(spec: str, data_dir: Path) -> list[Entity]:
    """'mel' -> the union of the MEL KBs under `data_dir`; otherwise the path of a JSONL KG."""
    if spec == "mel":
        return read_mel_kb(data_dir)
    path = Path(spec)
    if path.suffix != ".jsonl":
        raise ValueError(f"unknown KG {spec!r}: expected 'mel' or the path of a .jsonl file")
    return read_jsonl_kg(path)


def kb_for_dataset(data_dir: Path) -> list[Entity]:
    """What evaluation ranks against: every entity of the folder's KB files and annotations."""
    return read_mel_kb(data_dir)


# --------------------------------------------------------------------------- mentions


def read_mentions(data_dir: Path, dataset: str, split: str) -> list[Mention]:
    """The annotated mentions of one split of one benchmark, in file order.

    wikimel: splits.json ids; richpedia: train.json split into train/dev (see RICHPEDIA_DEV_FRACTION), test
    from test.json; wikidiverse: splits.json ids. A test split that is not in the folder (the RichpediaMEL
    and WikiDiverse tests are held back) raises FileNotFoundError. Mentions with no answer are skipped.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    folder = _dataset_folder(Path(data_dir), dataset)
    if dataset == "wikimel":
        path, samples = _wikimel_samples(folder)
        ids = _split_ids(folder / "splits.json", split, dataset)
        mentions = _mentions(dataset, path, samples, ids, "mentions", "entities", _wikimel_image(folder))
    elif dataset == "richpedia":
        mentions = _richpedia_mentions(folder, split)
    else:
        path, samples = _wikidiverse_samples(folder)
        ids = _split_ids(folder / "splits.json", split, dataset)
        mentions = _mentions(dataset, path, samples, ids, "mention", "entity", _wikidiverse_image(folder))
    logger.info(
        "%s %s: %d mentions (%d with a local image)",
        dataset,
        split,
        len(mentions),
        sum(m.image is not None for m in mentions),
    )
    return mentions


def _split_ids(path: Path, split: str, dataset: str) -> list[str]:
    splits: dict[str, list[Any]] = _load_json(path)
    if split not in splits:
        raise FileNotFoundError(
            f"{path} has no {split!r} split (it has {', '.join(splits)}); the {dataset} {split} data is not in this folder"
        )
    ids = [str(i) for i in splits[split]]
    others = {str(i) for name, other in splits.items() if name != split for i in other}
    if shared := sum(i in others for i in ids):
        logger.warning("%s: %d %s ids also appear in another split (kept as released)", path, shared, split)
    return ids


def _mentions(
    dataset: str,
    path: Path,
    samples: dict[str, dict[str, Any]],
    ids: Iterable[str],
    mention_key: str,
    name_key: str,
    image_of: _ImageOf,
) -> list[Mention]:
    mentions: list[Mention] = []
    no_sample = no_answer = 0
    for sid in ids:
        sample = samples.get(sid)
        if sample is None:
            no_sample += 1
            continue
        image = image_of(sid, sample)
        for j, (mention, name, answer) in enumerate(_triples(sample, mention_key, name_key, f"{path} sample {sid}")):
            if not answer:
                no_answer += 1
                continue
            mentions.append(
                Mention(
                    id=f"{dataset}:{sid}:{j}",
                    mention=mention,
                    context=str(sample.get("sentence") or ""),
                    image=image,
                    answer=answer,
                    answer_name=name,
                )
            )
    if no_sample:
        logger.info("%s: %d split ids have no annotated sample (skipped)", path, no_sample)
    if no_answer:
        logger.warning("%s: %d mentions have no answer (skipped)", path, no_answer)
    return mentions


def _wikimel_image(folder: Path) -> _ImageOf:
    """Sample image: images/<basename of imgPath> (KVQAimgs/<id>.<ext>), else images/<id>.jpg, when present."""
    local = _file_names(folder / "images")

    def image_of(sid: str, sample: dict[str, Any]) -> Path | None:
        names = [PurePosixPath(sample["imgPath"]).name] if sample.get("imgPath") else []
        names.append(f"{sid}.jpg")
        return next((folder / "images" / n for n in names if n in local), None)

    return image_of


def _wikidiverse_image(folder: Path) -> _ImageOf:
    """Sample image: images/<imgPath> when present."""
    local = _file_names(folder / "images")

    def image_of(sid: str, sample: dict[str, Any]) -> Path | None:
        rel = sample.get("imgPath")
        if not rel:
            return None
        path = folder / "images" / rel
        # one listing covers flat names; a nested path needs its own check
        return path if rel in local or (path.name != rel and path.is_file()) else None

    return image_of


def _no_image(sid: str, sample: dict[str, Any]) -> None:
    # RichpediaMEL's local images are entity images; no mention image is mapped.
    return None


def richpedia_dev_ids(sample_ids: Iterable[str]) -> set[str]:
    """The RichpediaMEL dev slice: RICHPEDIA_DEV_FRACTION of the ids, sorted then shuffled with a fixed seed."""
    order = sorted(sample_ids)
    random.Random(RICHPEDIA_DEV_SEED).shuffle(order)
    return set(order[: round(len(order) * RICHPEDIA_DEV_FRACTION)])


def _richpedia_mentions(folder: Path, split: str) -> list[Mention]:
    if split == "test":
        path = folder / "test.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the RichpediaMEL test split is held back from this folder")
        samples = _load_json(path)
        ids: list[str] = list(samples)
    else:
        path = folder / "train.json"
        samples = _load_json(path)
        dev = richpedia_dev_ids(samples)
        ids = [sid for sid in samples if (sid in dev) == (split == "dev")]
    return _mentions("richpedia", path, samples, ids, "mentions", "entities", _no_image)
