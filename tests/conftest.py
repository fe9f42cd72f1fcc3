"""Shared fixtures: the real encoders exported to ONNX once per session, and a small index built
from a slice of the real benchmark KG (the gold entities of a few WikiMEL test mentions plus others).

Every test that uses one of these (directly or through another fixture, e.g. a real server) must be marked
`slow`: collection fails otherwise, so `make test-fast` (`-m "not slow"`) never exports encoders or reads the
benchmark data. Fast API tests use the deterministic fake backend in tests/fakes.py instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("EL_DATA_DIR") or ROOT.parent / "shared" / "data" / "mel").resolve()


def require_data() -> Path:
    d = data_dir()
    if not (d / "WikiMEL").is_dir():
        pytest.skip(f"benchmark data not found at {d} (set EL_DATA_DIR; README: Benchmark data)")
    return d


# The session fixtures below that load the real encoders or read the benchmark data (minutes on a cold session).
REAL_FIXTURES = frozenset({"mel_dir", "zeroshot_onnx_dir", "onnx_dir", "zeroshot_runtime", "runtime", "test_mentions",
                           "small_kg", "small_index", "settings", "linker"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that uses a real-encoder fixture of this module without the `slow` marker."""
    unmarked = []
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("slow") is not None:
            continue
        # Only this module's fixtures count: a test module may define its own (fake) `settings`.
        used = sorted(name for name in REAL_FIXTURES & set(item.fixturenames)
                      if (defs := info.name2fixturedefs.get(name)) and defs[-1].func.__module__ == __name__)
        if used:
            unmarked.append(f"{item.nodeid} uses {', '.join(used)}")
    if unmarked:
        raise pytest.UsageError("mark these tests @pytest.mark.slow (they need the real encoders or the benchmark "
                                "data):\n  " + "\n  ".join(unmarked))


@pytest.fixture(scope="session")
def mel_dir() -> Path:
    return require_data()


@pytest.fixture(scope="session")
def zeroshot_onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backbones alone (EL_ENCODER__HEADS=none): zero-shot features."""
    from models.export import ensure_exported

    out = tmp_path_factory.mktemp("onnx-zeroshot")
    ensure_exported(out, text="minilm", image="efficientnet-lite0", clip_path=None, max_tokens=40, image_size=224)
    return out


@pytest.fixture(scope="session")
def onnx_dir(zeroshot_onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served default: the backbones plus the shipped student encoders (models/weights/student.pt)."""
    import shutil

    from models.checkpoint import STUDENT_WEIGHTS
    from models.export import ensure_exported

    out = tmp_path_factory.mktemp("onnx") / "student"
    shutil.copytree(zeroshot_onnx_dir, out)  # reuse the backbone export; only the student graphs are added
    ensure_exported(out, text="minilm", image="efficientnet-lite0", clip_path=None, max_tokens=40, image_size=224,
                    heads=STUDENT_WEIGHTS)
    return out


@pytest.fixture(scope="session")
def zeroshot_runtime(zeroshot_onnx_dir: Path):
    from models.runtime import EncoderRuntime

    return EncoderRuntime(zeroshot_onnx_dir, device="cpu")


@pytest.fixture(scope="session")
def runtime(onnx_dir: Path):
    from models.runtime import EncoderRuntime

    return EncoderRuntime(onnx_dir, device="cpu")


@pytest.fixture(scope="session")
def test_mentions(mel_dir: Path):
    """The first 60 WikiMEL test mentions (real annotations)."""
    from kg_index.readers import read_mentions

    return read_mentions(mel_dir, "wikimel", "test")[:60]


@pytest.fixture(scope="session")
def small_kg(mel_dir: Path, test_mentions):
    """About 400 real entities: the gold entities of test_mentions, every entity with an image, and the first
    entities of the KB as distractors (deterministic)."""
    from kg_index.readers import read_mel_kb

    kb = read_mel_kb(mel_dir)
    gold = {m.answer for m in test_mentions}
    chosen = [e for e in kb if e.id in gold or e.image is not None]
    seen = {e.id for e in chosen}
    chosen += [e for e in kb[:400] if e.id not in seen]
    return chosen


@pytest.fixture(scope="session")
def small_index(small_kg, runtime, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kg_index.build import build_index

    out = tmp_path_factory.mktemp("index") / "small"
    build_index(small_kg, runtime, out, kg="mel-slice", progress=False)
    return out


@pytest.fixture(scope="session")
def settings(onnx_dir: Path, small_index: Path, mel_dir: Path):
    from service.settings import Settings

    return Settings(data_dir=mel_dir, encoder={"onnx_dir": onnx_dir}, index={"dir": small_index})


@pytest.fixture(scope="session")
def linker(settings):
    from service.pipeline.linker import Linker

    lk = Linker.from_settings(settings)
    lk.warm_up()
    return lk


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server (tests/postgres.py) for the whole session; tests take fresh databases from it.
    Skipped only where psycopg (the `scale` extra) is not installed; CI installs it and PostgreSQL."""
    pytest.importorskip("psycopg", reason="the PostgreSQL job store needs the `scale` extra (psycopg)")
    from tests.postgres import LocalPostgres

    server = LocalPostgres().start()
    yield server
    server.stop()
