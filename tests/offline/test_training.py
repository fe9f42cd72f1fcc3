"""`el train`'s data hand-off (service/offline/training.py): benchmark records in, feature caches and KB rows out.

The readers, the encoder caches and the backbone are replaced by fakes that record what they were given, so this
runs in milliseconds; the real caching runs in `make train`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kg_index.build import load_entity_image
from kg_index.records import Entity, Mention
from models.feature_cache import CachedItems
from models.student import StudentConfig
from models.train import TrainConfig
from service.offline import training

IMG = Path("/img")
KB = [Entity("Q1", "Paris", "Capital of France.", IMG / "q1.jpg"), Entity("Q2", "Lyon", "City."),
      Entity("Q3", "Nice", "City on the coast.", IMG / "q3.jpg")]
SPLITS = {
    ("wikimel", "train"): [Mention("w1", "Paris", "Paris in spring.", IMG / "w1.jpg", "Q1", "Paris"),
                           Mention("w2", "Atlantis", "Lost city.", None, "Q99", "Atlantis"),  # gold not in the KB
                           Mention("w3", "Nice", "Nice beach.", None, "Q3", "Nice")],
    ("richpedia", "train"): [Mention("r1", "Lyon", "Lyon by night.", IMG / "r1.jpg", "Q2", "Lyon")],
    ("wikimel", "dev"): [Mention("d1", "Nice", "Nice harbour.", IMG / "d1.jpg", "Q3", "Nice"),
                         Mention("d2", "Paris", "Paris, Texas.", None, "Q1", "Paris")],
}


class FakeInnerLayerText:
    def __init__(self, runtime, bert, layer: int) -> None:
        self.runtime, self.bert, self.layer = runtime, bert, layer


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Fake readers over KB and SPLITS; a fake build_cache that records its arguments and returns matching arrays."""
    recorded: list[dict] = []

    def fake_build_cache(runtime, folder, ids, first, second, images, gold=(), *, desc, load_image, inner=None):
        recorded.append({"folder": folder.name, "ids": list(ids), "first": list(first), "second": list(second),
                         "images": list(images), "gold": list(gold), "load_image": load_image, "inner": inner})
        present = np.array([im is not None for im in images])
        n, k = len(ids), int(present.sum())
        return CachedItems(list(ids), list(gold), np.zeros((n, 2, 3), np.float16), np.ones((n, 2), bool),
                           np.ones((n, 2), bool), np.where(present, np.cumsum(present) - 1, -1).astype(np.int32),
                           np.zeros((k, 4), np.float16), np.zeros((k, 1, 4), np.float16))

    monkeypatch.setattr(training, "read_mel_kb", lambda data_dir: list(KB))
    monkeypatch.setattr(training, "read_mentions", lambda data_dir, ds, sp: list(SPLITS[ds, sp]))
    monkeypatch.setattr(training, "build_cache", fake_build_cache)
    monkeypatch.setattr(training, "blank_image_features", lambda runtime: (np.zeros(4), np.zeros((1, 4))))
    monkeypatch.setattr(training, "inner_backbone", lambda runtime: "fake-bert")
    monkeypatch.setattr(training, "InnerLayerText", FakeInnerLayerText)
    return recorded


def _cfg(tmp_path: Path) -> TrainConfig:
    return TrainConfig(data_dir=tmp_path / "mel", onnx_dir=tmp_path / "onnx", cache_dir=tmp_path / "features",
                       train_splits=(("wikimel", "train"), ("richpedia", "train")))


def test_records_keep_only_mentions_whose_gold_is_in_the_kb(calls: list[dict], tmp_path: Path) -> None:
    kb = training.kb_records(tmp_path)
    assert kb.ids == ["Q1", "Q2", "Q3"] and kb.first == ["Paris", "Lyon", "Nice"] and kb.gold == []
    assert kb.images == [IMG / "q1.jpg", None, IMG / "q3.jpg"]
    r = training.split_records(tmp_path, "wikimel", "train", set(kb.ids))
    assert r.ids == ["w1", "w3"] and r.first == ["Paris", "Nice"] and r.second == ["Paris in spring.", "Nice beach."]
    assert r.images == [IMG / "w1.jpg", None] and r.gold == ["Q1", "Q3"]


def test_prepare_hands_the_model_caches_and_kb_rows(calls: list[dict], tmp_path: Path) -> None:
    data = training.prepare(_cfg(tmp_path), runtime=object(), depth=StudentConfig())
    assert [c["folder"] for c in calls] == ["kb", "wikimel-train", "richpedia-train", "wikimel-dev"]
    assert all(c["load_image"] is load_entity_image and c["inner"] is None for c in calls)
    assert calls[0]["second"] == ["Capital of France.", "City.", "City on the coast."]
    # The two training splits become one set, in order, without the mention whose gold is not in the KB.
    assert data.train.ids == ["w1", "w3", "r1"]
    np.testing.assert_array_equal(data.train_gold, [0, 2, 1])  # KB rows of Q1, Q3, Q2
    np.testing.assert_array_equal(data.train.image_rows, [0, -1, 1])  # richpedia's image row follows wikimel's
    assert data.dev.ids == ["d1", "d2"]
    np.testing.assert_array_equal(data.dev_gold, [2, 0])
    assert data.student_mentions is None and data.inner_bert is None
    assert data.mentions(student=True) == (data.train, data.dev)


def test_a_shallow_student_gets_inner_layer_caches_of_the_same_mentions(calls: list[dict], tmp_path: Path) -> None:
    data = training.prepare(_cfg(tmp_path), runtime=object(), depth=StudentConfig(mention_layers=2, tuned_layers=1))
    inner = [c for c in calls if c["inner"] is not None]
    assert [c["folder"] for c in inner] == ["wikimel-train-layer1", "richpedia-train-layer1", "wikimel-dev-layer1"]
    assert all(c["inner"].layer == 1 and c["inner"].bert == "fake-bert" for c in inner)
    by_folder = {c["folder"]: c for c in calls}
    for split in ("wikimel-train", "richpedia-train", "wikimel-dev"):
        plain, deep = by_folder[split], by_folder[f"{split}-layer1"]
        assert (deep["ids"], deep["first"], deep["second"], deep["gold"]) == (
            plain["ids"], plain["first"], plain["second"], plain["gold"])
    student_train, student_dev = data.mentions(student=True)
    assert student_train.ids == data.train.ids and student_dev.ids == data.dev.ids
    assert data.inner_bert == "fake-bert"
