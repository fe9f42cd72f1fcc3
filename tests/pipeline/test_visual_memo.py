"""The visual term of a mention without an image is remembered per candidate image row (visual_memo.py): the same
answers as solving it every time, never for a mention with an image, an explained request or a row a live index
appended, and gone with the index it was made for."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from service.pipeline import rerank
from service.pipeline.types import LinkQuery
from service.pipeline.visual_memo import BlankVisualMemo, _memos, memo_for


def _queries(test_mentions, n: int, image=None) -> list[LinkQuery]:
    return [LinkQuery(m.mention, m.context, image, top_k=10) for m in test_mentions[:n]]


def _never(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch with a memo of its own: nothing is ever remembered."""
    monkeypatch.setattr(rerank, "memo_for", lambda image_local, key: BlankVisualMemo(int(image_local.shape[0])))


@pytest.mark.slow
def test_remembered_values_give_the_same_answers(linker, test_mentions, monkeypatch: pytest.MonkeyPatch) -> None:
    queries = _queries(test_mentions, 24)
    with monkeypatch.context() as m:
        _never(m)
        want = linker.link_batch(queries).results
    memo = rerank.blank_visual_memo(linker.index, linker.rerank, linker.device)
    linker.link_batch(queries[:12])  # fills the memo for these mentions' candidates
    before = memo.hits
    got = linker.link_batch(queries).results  # half of it from the memo, batched with the rest differently
    assert memo.hits > before
    assert memo.known[memo.n]  # the candidates without an image: one slot for all of them
    for a, b in zip(got, want):
        assert [e.id for e in a.entities] == [e.id for e in b.entities]
        np.testing.assert_allclose([e.rerank_score for e in a.entities], [e.rerank_score for e in b.entities],
                                   atol=1e-6)


@pytest.mark.slow
def test_a_mention_with_an_image_or_asking_for_plans_is_solved(linker, test_mentions,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from models import otmel

    photo = Image.new("RGB", (64, 64), (200, 30, 30))
    linker.link_batch(_queries(test_mentions, 8))  # the memo knows these candidates now
    solved: list[int] = []
    inner = otmel.cross_g2l
    monkeypatch.setattr(otmel, "cross_g2l", lambda *a, **kw: solved.append(len(a[0])) or inner(*a, **kw))
    linker.link_batch(_queries(test_mentions, 8))
    assert solved == []  # text only and known: no visual problem at all
    linker.link_batch(_queries(test_mentions, 1, photo))
    assert solved and solved[-1] > 1  # its own image against each candidate's
    explained = [LinkQuery(test_mentions[0].mention, test_mentions[0].context, top_k=10, explain=True)]
    out = linker.link_batch(explained).results[0]
    assert solved[-1] >= 1 and out.explain and out.explain[0].image is None


def test_slots_keep_only_the_rows_of_the_loaded_index() -> None:
    memo = BlankVisualMemo(5)
    rows = np.array([0, 4, -1, 5, 9])  # 5 and 9: appended by a live index
    assert memo.slots(rows).tolist() == [0, 4, 5, -1, -1]
    memo.store(memo.slots(rows), np.array([1, 2, 3, 4, 5], np.float32))
    assert memo.known.tolist() == [True, False, False, False, True, True]
    assert memo.values[[0, 4, 5]].tolist() == [1, 2, 3]


def test_a_memo_goes_with_its_index_and_differs_per_solver_setting() -> None:
    images = np.zeros((3, 49, 8), np.float16)
    a = memo_for(images, ("eps", 0.05))
    assert memo_for(images, ("eps", 0.05)) is a and memo_for(images, ("eps", 0.1)) is not a
    key = id(images)
    assert key in _memos
    del images, a
    gc.collect()
    assert key not in _memos
