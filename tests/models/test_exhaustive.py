"""The teacher's exhaustive protocol (models/exhaustive.py) gives exactly the ranks of scoring every
(mention, entity) pair outright, while solving fewer cross terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.exhaustive import bounded_top1, brute_force_ranks, encode_kb, exhaustive_ranks, full_scores
from models.feature_cache import CachedItems
from models.otmel import HeadConfig
from models.student import OTMELStudent, StudentConfig
from models.teacher import OTMELTeacher, TeacherConfig
from models.train import item_tensors

HEAD = HeadConfig(text_dim=16, image_dim=12, image_patches=4, hidden=8, mlp=16)


def _items(n: int, images: list[int], rng: np.random.Generator, gold: list[str] | None = None) -> CachedItems:
    """Fake cached features (a unit-test fake, not real backbone output)."""
    t = 6
    lengths = rng.integers(2, t + 1, n)
    text_mask = np.arange(t)[None] < lengths[:, None]
    first_mask = text_mask & (np.arange(t)[None] < 2)
    rows = np.full(n, -1, np.int32)
    rows[images] = np.arange(len(images))
    return CachedItems(
        ids=[f"x{i}" for i in range(n)], gold=gold or [], tokens=rng.standard_normal((n, t, 16)).astype(np.float16),
        text_mask=text_mask, first_mask=first_mask, image_rows=rows,
        image_global=rng.standard_normal((len(images), 12)).astype(np.float16),
        image_patches=rng.standard_normal((len(images), 4, 12)).astype(np.float16))


def _setup(make, rng: np.random.Generator) -> tuple:
    """A fresh model with non-zero blank images (so that entities without one differ from the blank-blank pair), an
    80-entity KB with 3 images and 12 mentions with 2."""
    model = make().eval()
    with torch.no_grad():
        for head in (model.mention, model.entity):
            head.blank_global.normal_()
            head.blank_patches.normal_()
    return model, _items(80, images=[3, 40, 41], rng=rng), _items(12, images=[0, 5], rng=rng)


@pytest.mark.parametrize("make", [lambda: OTMELTeacher(TeacherConfig(head=HEAD)),
                                  lambda: OTMELStudent(StudentConfig(head=HEAD))], ids=["teacher", "student"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exhaustive_ranks_equal_brute_force(make, seed: int) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, kb, mentions = _setup(make, rng)
    gold = rng.integers(0, 80, 12)
    kb_enc = encode_kb(model, kb, batch=32, progress=False)
    ranks, stats = exhaustive_ranks(model, kb_enc, mentions, gold, batch=5, progress=False)
    assert ranks == brute_force_ranks(model, kb_enc, mentions, gold)
    assert stats.pairs_total == 12 * 80 and 12 <= stats.pairs_solved <= stats.pairs_total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_scores_and_bounded_top1_agree_with_scoring_every_pair(seed: int) -> None:
    """The protocol as it is (every cross term) gives the model's own overall scores, and the label-free search
    for the top entity finds the same top as scoring every pair, in fewer cross terms."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, kb, mentions = _setup(lambda: OTMELTeacher(TeacherConfig(head=HEAD)), rng)
    kb_enc = encode_kb(model, kb, batch=32, progress=False)
    with torch.no_grad():
        overall = model.scores(model.encode_mentions(*item_tensors(mentions, np.arange(12))), kb_enc.enc).overall
    full = full_scores(model, kb_enc, mentions, np.arange(12), chunk=32)
    assert torch.allclose(full, overall, atol=1e-5)
    tops, stats = bounded_top1(model, kb_enc, mentions, batch=5, first=2, chunk=8)
    assert tops == overall.argmax(1).tolist()
    assert stats.pairs_total == 12 * 80 and 12 <= stats.pairs_solved <= stats.pairs_total


def test_clear_winners_need_no_cross_terms() -> None:
    """When the separable score alone separates the gold by more than the cross terms can move it, only
    the gold's own cross term is solved."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = OTMELTeacher(TeacherConfig(head=HEAD)).eval()
    kb = _items(50, images=[], rng=rng)
    kb_enc = encode_kb(model, kb, progress=False)
    # Make the KB's retrieval vectors far apart in score: entity i scores 10 * i for every mention.
    kb_enc.vectors = torch.zeros_like(kb_enc.vectors)
    kb_enc.vectors[:, 0] = 10.0 * torch.arange(50)
    mentions = _items(3, images=[], rng=rng)
    orig = model.encode_mentions

    def encode(*feats):  # mentions' retrieval vectors = e_0 (unit-test override)
        enc = orig(*feats)
        enc.g_text = torch.zeros_like(enc.g_text)
        enc.g_text[:, 0] = 1.0
        enc.g_image = torch.zeros_like(enc.g_image)
        enc.f_it = torch.zeros_like(enc.f_it)
        enc.f_ti = torch.zeros_like(enc.f_ti)
        return enc

    model.encode_mentions = encode  # type: ignore[method-assign]
    import math

    gold = np.array([49, 10, 0])
    ranks, stats = exhaustive_ranks(model, kb_enc, mentions, gold, progress=False)
    # score = 10 * i / sqrt(6) (+ cross terms within 1/3): rank = 50 - i
    assert ranks == [1, 40, 50] and math.isclose(stats.pairs_solved, 3)
