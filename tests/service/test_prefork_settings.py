"""The settings of one of EL_WORKERS processes (service/prefork.py: per_worker): the single-process defaults give
way, what was set explicitly stays."""

from __future__ import annotations

import pytest

from service.prefork import per_worker
from service.settings import Settings


def test_defaults_give_way_to_the_other_processes() -> None:
    s = per_worker(Settings(), 2)
    assert (s.batching.max_concurrent, s.batching.split_min, s.encoder.intra_op_threads) == (1, 0, 1)
    assert per_worker(Settings(), 4).batching.max_concurrent == 1  # max_concurrent // workers, at least 1


def test_explicit_settings_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EL_BATCHING__MAX_CONCURRENT", "3")
    monkeypatch.setenv("EL_BATCHING__SPLIT_MIN", "8")
    monkeypatch.setenv("EL_ENCODER__INTRA_OP_THREADS", "2")
    s = per_worker(Settings(), 2)
    assert (s.batching.max_concurrent, s.batching.split_min, s.encoder.intra_op_threads) == (3, 8, 2)
    assert s.batching.max_wait_ms == Settings().batching.max_wait_ms  # the rest as configured
