"""`el bench-scale`: the synthetic KG's construction, the row-mapping views the reranker reads, the factory
grid, recall, and (slow) a whole run at 5,000 entities grown from the small real index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.offline.bench_scale import (
    FactoryGrid,
    K,
    RowMap,
    format_table,
    ivf_lists,
    recall_at,
    run_bench_scale,
    synthesize,
)


def test_row_map_reads_source_rows_the_way_the_reranker_indexes() -> None:
    base = np.arange(5 * 4 * 3, dtype=np.float16).reshape(5, 4, 3)
    src = np.array([0, 1, 2, 3, 4, 2, 2, 0])
    view = RowMap(base, src)
    assert view.shape == (8, 4, 3) and len(view) == 8 and view.dtype == np.float16 and view.ndim == 3
    flat = np.array([5, 0, 7])
    np.testing.assert_array_equal(view[flat], base[[2, 0, 0]])
    np.testing.assert_array_equal(view[flat, :2], base[[2, 0, 0], :2])
    np.testing.assert_array_equal(np.asarray(view, dtype=np.float32), base[src].astype(np.float32))


def _clustered(rng: np.random.Generator, n: int = 600, d: int = 32) -> np.ndarray:
    centres = rng.standard_normal((20, d))
    x = centres[rng.integers(20, size=n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_synthetic_entities_sit_near_their_source_and_keep_its_norm() -> None:
    real = _clustered(np.random.default_rng(1))
    vecs, src, info = synthesize(real, 3000, seed=0)
    assert vecs.shape == (3000, 32) and vecs.dtype == np.float32 and info == {**info, "real": 600, "synthetic": 2400}
    np.testing.assert_array_equal(vecs[:600], real)  # the real ones first, unchanged
    np.testing.assert_array_equal(src[:600], np.arange(600))
    syn, s = vecs[600:], src[600:]
    np.testing.assert_allclose(np.linalg.norm(syn, axis=1), np.linalg.norm(real[s], axis=1), rtol=1e-4)
    # Closer to the source than to a random real entity, yet no exact copy of it.
    to_source = np.linalg.norm(syn - real[s], axis=1)
    to_random = np.linalg.norm(syn - real[np.random.default_rng(2).integers(600, size=len(syn))], axis=1)
    assert np.median(to_source) < 0.5 * np.median(to_random) and to_source.min() > 0
    assert len(np.unique(s)) > 500  # the sources are spread over the KG
    # Deterministic for a seed; a smaller N is a subset of the real entities.
    np.testing.assert_array_equal(synthesize(real, 3000, seed=0)[0], vecs)
    sub, sub_src, _ = synthesize(real, 100, seed=0)
    assert len(set(sub_src.tolist())) == 100 and np.array_equal(sub, real[sub_src])


def test_factory_specs_and_recall() -> None:
    assert FactoryGrid.parse("Flat") == FactoryGrid("Flat", None, (0,))
    assert FactoryGrid.parse("HNSW32,Flat:efSearch=64/128") == FactoryGrid("HNSW32,Flat", "efSearch", (64, 128))
    assert (ivf_lists(1_000_000), ivf_lists(100_000), ivf_lists(5_000)) == (4096, 1024, 256)
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at(exact, exact) == 1.0
    assert recall_at(np.array([[4, 3, 9, -1], [-1, -1, -1, -1]]), exact) == 0.25  # order ignored, -1 a miss


def test_bench_scale_is_an_el_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench-scale", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--entities", "--factory", "--queries", "--link-n", "--cache", "--out"):
        assert flag in out


@pytest.mark.slow
def test_bench_scale_at_5000_entities(linker, mel_dir: Path, tmp_path: Path) -> None:
    grid = [FactoryGrid.parse(s) for s in ("Flat", "HNSW16,Flat:efSearch=16/64", "IVF64,Flat:nprobe=1/8")]
    report = run_bench_scale(linker, mel_dir, entities=5000, cache=tmp_path / "cache", grid=grid, queries=150,
                             single=10, batch=32, link_n=4)
    assert report["entities"] == 5000 and report["synthetic"]["real"] == len(linker.index)
    assert report["synthetic"]["synthetic"] == 5000 - len(linker.index) and report["k"] == K
    factories = {f["factory"]: f for f in report["factories"]}
    assert list(factories) == ["Flat", "HNSW16,Flat", "IVF64,Flat"]
    for f in factories.values():
        assert f["build_s"] >= 0 and f["disk_mb"] > 0 and not f["cached"]
        for r in f["runs"]:
            assert 0.0 <= r[f"recall_at_{K}"] <= 1.0
            assert 0 < r["single_p50_ms"] <= r["single_p99_ms"] and r["batch"] == 32 and r["batch_per_query_ms"] > 0
    assert factories["Flat"]["runs"][0][f"recall_at_{K}"] == 1.0  # the reference against itself
    assert [r["efSearch"] for r in factories["HNSW16,Flat"]["runs"]] == [16, 64]
    ivf = factories["IVF64,Flat"]
    assert ivf["train_points"] == 40 * 64 and [r["nprobe"] for r in ivf["runs"]] == [1, 8]
    # One list of 64 finds fewer of the exact top 32 than 8 lists do.
    assert ivf["runs"][0][f"recall_at_{K}"] < ivf["runs"][1][f"recall_at_{K}"]
    link = report["link"]
    assert link["n"] == 4 and link["scaled"]["entities"] == 5000 and link["baseline"]["entities"] == len(linker.index)
    assert link["p50_ratio"] == pytest.approx(link["scaled"]["p50_ms"] / link["baseline"]["p50_ms"], abs=1e-3)
    http = report["link_http"]  # the same through the service's HTTP app on loopback
    assert http["n"] == 4 and http["scaled"]["entities"] == 5000 and 0 < http["scaled"]["p50_ms"] <= http["scaled"]["p99_ms"]
    assert set(report["goals"]) == {"search", "link", "link_http"}
    json.dumps(report)  # serialisable as it is written
    assert "| HNSW16,Flat | efSearch=64 |" in format_table(report)
    # A rerun reads the built indexes back from the cache.
    again = run_bench_scale(linker, mel_dir, entities=5000, cache=tmp_path / "cache", grid=grid[:1], queries=150,
                            single=10, batch=32, link=False)
    assert again["factories"][0]["cached"] and again["factories"][0]["build_s"] == factories["Flat"]["build_s"]
    assert "link" not in again and "link_http" not in again
