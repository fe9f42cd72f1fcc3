"""A batch that runs alone is linked as two halves at once (service/pipeline/halves.py): the same answers as the
whole batch, only when no other batch runs, and errors of either half reach the caller."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

from service.pipeline.halves import Occupancy, in_halves
from service.pipeline.types import LinkQuery


def test_halves_run_at_once_and_merge_in_order() -> None:
    occ = Occupancy()
    seen: list[tuple[list[int], str]] = []
    both = threading.Barrier(2, timeout=10)  # each half waits for the other: they must run at the same time

    def run(part: list[int]) -> list[int]:
        seen.append((part, threading.current_thread().name))
        both.wait()
        return [x * 10 for x in part]

    assert in_halves(occ, [1, 2, 3, 4, 5], run, lambda a, b: a + b) == [10, 20, 30, 40, 50]
    assert sorted(p for p, _ in seen) == [[1, 2], [3, 4, 5]]
    assert len({name for _, name in seen}) == 2


@pytest.mark.parametrize("bad", ["first", "second"])
def test_an_error_in_either_half_is_raised_after_both_end(bad: str) -> None:
    occ = Occupancy()
    done: list[str] = []

    def run(part: list[int]) -> list[int]:
        which = "first" if part[0] == 0 else "second"
        if which == bad:
            raise ValueError(which)
        done.append(which)
        return part

    with pytest.raises(ValueError, match=bad):
        in_halves(occ, [0, 1, 2, 3], run, lambda a, b: a + b)
    assert done == ["second" if bad == "first" else "first"]  # the other half ran to its end


def test_occupancy_says_alone_only_for_the_first_batch_in_flight() -> None:
    occ = Occupancy()
    with occ.enter() as a, occ.enter() as b:
        assert (a, b, occ.count) == (True, False, 2)
    with occ.enter() as c:
        assert c and occ.count == 1
    assert occ.count == 0


# ---- the real pipeline (real encoders, a real index of about 400 entities) ----


def _sizes(linker, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    inner = type(linker)._link

    def spy(self, snap, queries, *args):
        sizes.append(len(queries))
        return inner(self, snap, queries, *args)

    monkeypatch.setattr(type(linker), "_link", spy)
    return sizes


def _whole(linker):
    other = copy.copy(linker)
    other.settings = linker.settings.model_copy(
        update={"batching": linker.settings.batching.model_copy(update={"split_min": 0})})
    return other


@pytest.mark.slow
@pytest.mark.onnx
def test_a_batch_alone_is_linked_in_halves_with_the_whole_batch_answers(linker, test_mentions,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    queries = [LinkQuery(m.mention, m.context, top_k=10) for m in test_mentions]
    assert len(queries) >= linker.settings.batching.split_min
    want = _whole(linker).link_batch(queries)
    sizes = _sizes(linker, monkeypatch)
    got = linker.link_batch(queries)
    assert sorted(sizes) == [len(queries) // 2, len(queries) - len(queries) // 2]
    assert len(got.results) == len(want.results)
    for w, g in zip(want.results, got.results):
        assert [e.id for e in g.entities] == [e.id for e in w.entities]
        np.testing.assert_allclose([e.score for e in g.entities], [e.score for e in w.entities], atol=1e-5)
        assert g.nil == w.nil and (g.confidence is None) == (w.confidence is None)
        if w.confidence is not None:
            assert g.confidence == pytest.approx(w.confidence, abs=1e-5)
    # The visual unit solves each distinct (mention image, entity image) pair once per batch: halves may repeat a few
    assert sum(s.problems for s in got.ot_stats) >= sum(s.problems for s in want.ot_stats)
    assert set(got.timings_ms) == set(want.timings_ms)


@pytest.mark.slow
@pytest.mark.onnx
def test_no_halves_beside_another_batch_or_below_the_minimum(linker, test_mentions,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    queries = [LinkQuery(m.mention, m.context, top_k=10) for m in test_mentions]
    sizes = _sizes(linker, monkeypatch)
    with linker._occupancy.enter():  # another batch in flight
        linker.link_batch(queries)
    linker.link_batch(queries[: linker.settings.batching.split_min - 1])
    assert sizes == [len(queries), linker.settings.batching.split_min - 1]


@pytest.mark.slow
@pytest.mark.onnx
def test_a_lone_single_request_may_scan_on_the_spare_core(linker, test_mentions,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One mention, no other batch running: the search gets the helper thread as a spare core (used where the
    index's plan measured two row halves faster; forced on here) and answers as without it; beside another batch
    it does not get one."""
    from dataclasses import replace

    from kg_index.exact import ExactSearch

    searcher = linker.index.exact
    assert searcher is not None
    calls: list[int] = []
    inner = ExactSearch._in_row_halves
    monkeypatch.setattr(ExactSearch, "_in_row_halves", lambda self, *a: calls.append(1) or inner(self, *a))
    query = [LinkQuery(test_mentions[0].mention, test_mentions[0].context, top_k=10)]
    want = linker.link_batch(query).results[0]  # the small test index's plan: FAISS's scan
    assert not calls
    monkeypatch.setattr(searcher, "plan", replace(searcher.plan, small="halves"))
    got = linker.link_batch(query).results[0]
    assert calls == [1]
    assert [e.id for e in got.entities] == [e.id for e in want.entities]
    np.testing.assert_allclose([e.score for e in got.entities], [e.score for e in want.entities], atol=1e-5)
    with linker._occupancy.enter():  # another batch in flight: no spare core
        linker.link_batch(query)
    assert calls == [1]
