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


# ---- EL_WORKERS=auto (service/prefork.py: worker_count) ----

def _cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    tmp_path.mkdir()
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return tmp_path


def test_usable_cpus_follow_affinity_and_the_cgroup_quota(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service import prefork

    monkeypatch.setattr(prefork.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert prefork.usable_cpus(tmp_path / "none") == 6  # no cgroup files: the affinity
    assert prefork.usable_cpus(_cgroup(tmp_path / "a", v2="max 100000")) == 6  # no quota
    assert prefork.usable_cpus(_cgroup(tmp_path / "b", v2="200000 100000")) == 2
    assert prefork.usable_cpus(_cgroup(tmp_path / "c", v2="150000 100000")) == 1  # whole CPUs only
    assert prefork.usable_cpus(_cgroup(tmp_path / "d", v2="50000 100000")) == 1  # never 0
    assert prefork.usable_cpus(_cgroup(tmp_path / "e", v1=("300000", "100000"))) == 3  # cgroup v1
    assert prefork.usable_cpus(_cgroup(tmp_path / "f", v1=("-1", "100000"))) == 6
    assert prefork.usable_cpus(_cgroup(tmp_path / "g", v2="2000000 100000")) == 6  # a quota above the affinity


def test_available_memory_reads_meminfo(tmp_path) -> None:
    from service.prefork import available_memory

    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   5242880 kB\n")
    assert available_memory(tmp_path / "meminfo") == 5 << 30
    assert available_memory(tmp_path / "missing") is None


@pytest.mark.parametrize(("cpus", "mem_gib", "want"), [
    (1, 20, 1), (2, 20, 2), (3, 20, 3), (16, 64, 4),  # one per CPU, at most AUTO_MAX_WORKERS
    (8, 5, 2), (8, 1, 1),  # at most one per 2 GiB available, at least one
    (2, None, 2),  # memory unknown: the CPUs decide
])
def test_auto_counts_cpus_within_memory(monkeypatch: pytest.MonkeyPatch, cpus: int, mem_gib: int | None,
                                        want: int) -> None:
    from service import prefork

    monkeypatch.setattr(prefork, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(prefork, "available_memory", lambda: None if mem_gib is None else mem_gib << 30)
    monkeypatch.setenv("EL_ENCODER__DEVICE", "cpu")
    assert Settings().workers == "auto"  # the default
    assert prefork.worker_count(Settings()) == want


def test_explicit_workers_and_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from service import prefork

    monkeypatch.setattr(prefork, "usable_cpus", lambda: 8)
    monkeypatch.setattr(prefork, "available_memory", lambda: 64 << 30)
    monkeypatch.setenv("EL_WORKERS", "3")
    assert prefork.worker_count(Settings()) == 3  # as set, whatever the machine
    monkeypatch.setenv("EL_WORKERS", "auto")
    monkeypatch.setattr("models.runtime.picks_cuda", lambda device: True)
    assert prefork.worker_count(Settings()) == 1  # the encoders on CUDA: one process holds the GPU
    monkeypatch.setenv("EL_WORKERS", "0")
    with pytest.raises(ValueError):
        Settings()
