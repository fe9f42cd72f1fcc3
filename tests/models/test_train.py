"""models/train.py on prepared arrays alone (no benchmark files, no encoders): one teacher and one student epoch over
a planted toy task, through the same `train` that `el train` calls after service/offline/training.py has
prepared the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.contract import EncoderSpec
from models.feature_cache import CachedItems
from models.student import StudentConfig
from models.train import Data, TrainConfig, concat_items, train

T, DT, DI, P = 6, 16, 8, 4  # tokens, text dim, image dim, patches


def _items(rng: np.random.Generator, base: np.ndarray, ids: list[str], gold: list[str], with_image: np.ndarray,
           noise: float) -> CachedItems:
    n = len(ids)
    tokens = (base[:, None, :] + noise * rng.normal(size=(n, T, DT))).astype(np.float16)
    mask = np.ones((n, T), bool)
    mask[:, T - 2 :] = False  # padding
    rows = np.where(with_image, np.cumsum(with_image) - 1, -1).astype(np.int32)
    k = int(with_image.sum())
    return CachedItems(ids, gold, tokens, mask, mask.copy(), rows, rng.normal(size=(k, DI)).astype(np.float16),
                       rng.normal(size=(k, P, DI)).astype(np.float16))


@pytest.fixture()
def toy(tmp_path: Path) -> tuple[TrainConfig, EncoderSpec, Data]:
    """64 KB entities; each mention's tokens are its gold entity's plus noise."""
    rng = np.random.default_rng(0)
    n_kb = 64
    centres = rng.normal(size=(n_kb, DT))
    kb = _items(rng, centres, [f"Q{i}" for i in range(n_kb)], [], rng.random(n_kb) < 0.5, 0.1)

    def mentions(prefix: str, gold: np.ndarray) -> CachedItems:
        return _items(rng, centres[gold], [f"{prefix}{i}" for i in range(len(gold))], [f"Q{g}" for g in gold],
                      rng.random(len(gold)) < 0.5, 0.3)

    train_gold, dev_gold = rng.integers(0, n_kb, 48), rng.integers(0, n_kb, 16)
    train_items = concat_items([mentions("a", train_gold[:20]), mentions("b", train_gold[20:])])
    data = Data(kb, train_items, mentions("d", dev_gold), train_gold, dev_gold,
                (np.zeros(DI, np.float32), np.zeros((P, DI), np.float32)))
    cfg = TrainConfig(data_dir=tmp_path / "unused", onnx_dir=tmp_path / "unused", weights_dir=tmp_path / "weights",
                      reports_dir=tmp_path / "reports", batch_size=16, teacher_epochs=1, student_epochs=1,
                      train_splits=(("toy", "train"),))
    spec = EncoderSpec(name="toy", text_dim=DT, image_dim=DI, image_patches=P, max_tokens=T, image_size=32,
                       pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0), tokenizer="none", weights_sha256="0")
    return cfg, spec, data


def test_train_on_prepared_arrays_writes_weights_log_and_plot(toy) -> None:
    cfg, spec, data = toy
    summary = train(cfg, spec, data, StudentConfig(), cache_s=2.5)
    assert summary["n_train"] == 48 and summary["cache_s"] == 2.5 and summary["total_s"] >= 2.5
    assert summary["encoder_signature"] == spec.signature()
    for name in ("teacher", "student"):
        (epoch,) = summary[name]["epochs"]
        # Chance among 64 entities is an MRR of about 0.07: one epoch already learns the planted links.
        assert 0.2 < epoch["dev_mrr"] <= 1.0 and 0.0 <= epoch["dev_h1"] <= epoch["dev_mrr"]
        assert 0.0 < epoch["dev_retrieval_mrr"] <= 1.0
        assert (cfg.weights_dir / f"{name}.pt").exists()
    assert json.loads((cfg.reports_dir / "train-log.json").read_text())["student"]["best_epoch"] == 1
    assert (cfg.reports_dir / "train.png").read_bytes()[:4] == b"\x89PNG"
