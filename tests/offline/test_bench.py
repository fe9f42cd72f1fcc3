"""`el bench` (service/offline/bench*.py): the report's shape, and ratios that follow from the rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import contract
from service.offline.bench import PLAIN, PLAIN_B1, TEACHER, Row, add_ratios, format_rows, report, write_bench


def _row(name: str, per_s: float, cpu: float, h1: float, h1_subset: float | None = None) -> Row:
    return Row(name, "test", 10, per_s, 1.0, 2.0, 3.0, cpu, h1=h1, h1_subset=h1_subset)


def test_ratios_are_computed_from_the_rows() -> None:
    rows = [_row(PLAIN, 100.0, 0.02, 0.60, 0.55), _row("served", 50.0, 0.05, 0.90, 0.85),
            Row(TEACHER, "test", 5, 2.0, None, None, None, 1.0, h1=0.80, h1_subset=0.80),
            Row("ot_ours", "test", 99, 500.0, None, None, None, 0.001)]
    add_ratios(rows)
    served = rows[1].ratios
    assert served[PLAIN] == {"mentions_per_s": 0.5, "cpu_s_per_mention": 2.5, "h1_points": 30.0}
    assert served[TEACHER] == {"mentions_per_s": 25.0, "cpu_s_per_mention": 0.05, "h1_points": 5.0}  # on the subset
    assert PLAIN not in rows[0].ratios and rows[2].ratios[PLAIN]["h1_points"] == 25.0
    assert rows[3].ratios == {}  # OT rows count problems, not mentions: compared with each other only (bench_ot)
    other = Row("served_image_b8", "test", 6, 20.0, 1.0, 2.0, 3.0, 0.04, h1=0.5)
    add_ratios([rows[0], other])
    assert other.ratios[PLAIN]["h1_points"] is None  # other mentions: no H@1 comparison


def test_single_request_latency_is_against_the_plain_single_row() -> None:
    rows = [_row(PLAIN, 100.0, 0.02, 0.6), Row(PLAIN_B1, "test", 5, 40.0, 20.0, 25.0, 30.0, 0.03, h1=0.6),
            Row("served_b1", "test", 5, 80.0, 12.5, 14.0, 15.0, 0.01, h1=0.9),
            Row("served_http_c1", "test", 5, 60.0, 16.0, 18.0, 19.0, 0.01, h1=0.9),
            Row("served_http_w2_c1", "test", 5, 60.0, 15.0, 18.0, 19.0, 0.01, h1=0.9),  # 2 server processes
            Row("served_http_w2_c8", "test", 5, 90.0, 30.0, 38.0, 39.0, 0.01, h1=0.9)]  # not a single request
    rep = report(rows, n_mentions=5)
    assert rep["single_request"] == {"baseline": PLAIN_B1, "baseline_p50_ms": 20.0,
                                     "p50_ratio": {"served_b1": 0.625, "served_http_c1": 0.8, "served_http_w2_c1": 0.75}}
    assert "served_http_c1 p50 = 0.80 x plain_biencoder_b1's" in format_rows(rep)
    assert report(rows[:1], n_mentions=5)["single_request"] == {}  # no single-request baseline: no ratios


def test_served_rows_against_the_teacher_three_ways() -> None:
    """The teacher row's rate is the protocol's (every entity scored); `teacher_shortcuts` also compares the batched
    served rows with the label-free bounded search for the top entity and the labelled bound (served_b1 and HTTP
    rows are not batched in process: left out)."""
    teacher = Row(TEACHER, "test", 200, 0.5, None, None, None, 2.0, h1=0.8, h1_subset=0.8,
                  extra={"kb_encode_s": 8.0, "top1_bounded_mentions_per_s": 50.0, "gold_bounded_mentions_per_s": 100.0})
    rows = [teacher, _row("served_b1", 100.0, 0.01, 0.9), _row("served_b64", 500.0, 0.003, 0.9),
            _row("served_b64_adaptive", 700.0, 0.002, 0.9), _row("served_http_c32", 400.0, 0.004, 0.9),
            _row("served_b16", 400.0, 0.004, 0.9)]  # batches of 16: not mistaken for batch 1
    rep = report(rows, n_mentions=200)
    assert rep["teacher_shortcuts"] == {
        "teacher_mentions_per_s": {"exhaustive": 0.5, "top1_bounded": 50.0, "gold_bounded": 100.0}, "kb_encode_s": 8.0,
        "ratio": {"served_b64": {"exhaustive": 1000.0, "top1_bounded": 10.0, "gold_bounded": 5.0},
                  "served_b64_adaptive": {"exhaustive": 1400.0, "top1_bounded": 14.0, "gold_bounded": 7.0},
                  "served_b16": {"exhaustive": 800.0, "top1_bounded": 8.0, "gold_bounded": 4.0}}}
    assert "served_b64 = 1000.0 x the exhaustive teacher, 10.0 x the top1_bounded teacher" in format_rows(rep)
    assert report(rows[1:], n_mentions=200)["teacher_shortcuts"] == {}  # no teacher row: nothing


def test_report_writes_json_and_chart(tmp_path: Path) -> None:
    rep = report([_row(PLAIN, 100.0, 0.02, 0.6), _row("served_b64", 80.0, 0.03, 0.9)], n_mentions=10, machine={})
    chart = write_bench(rep, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][1]["ratios"][PLAIN]["mentions_per_s"] == 0.8
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert "served_b64" in format_rows(rep)


@pytest.mark.slow
def test_bench_runs_every_part_on_a_few_mentions(linker, mel_dir: Path, tmp_path: Path) -> None:
    """The real parts on a tiny n: plain bi-encoder (over the small index's KG), served rows, HTTP when wrk is
    installed, Sinkhorn against POT on captured problems. The teacher row needs the full KB: skipped here."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("ot")
    from service.offline import bench_http
    from service.offline.bench_run import BenchOptions, run_bench

    opts = BenchOptions(n=24, image_n=8, batch=8, skip_teacher=True, http_seconds=1.0, http_concurrency=(1, 2),
                        paired_rounds=2, paired_seconds=1.0, paired_n=16, cache_dir=tmp_path / "cache")
    rep = run_bench(linker.with_skip_margin(0.05), mel_dir, opts)
    rows = {r["name"]: r for r in rep["rows"]}
    assert {PLAIN, PLAIN_B1, "served_b1", "served_b8", "served_b8_adaptive", "served_image_b1", "served_image_b8", "ot_ours",
            "ot_pot_sinkhorn", "ot_pot_log_sinkhorn"} <= set(rows)
    assert rows[PLAIN_B1]["batch"] == 1 and rows[PLAIN_B1]["n"] == 24
    assert rep["single_request"]["p50_ratio"]["served_b1"] == pytest.approx(
        rows["served_b1"]["p50_ms"] / rows[PLAIN_B1]["p50_ms"], abs=1e-3)
    for name in ("served_b1", "served_b8"):
        r = rows[name]
        assert r["n"] == 24 and 0.0 <= r["h1"] <= 1.0 and r["mentions_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"]
        assert r["ratios"][PLAIN]["mentions_per_s"] == pytest.approx(r["mentions_per_s"] / rows[PLAIN]["mentions_per_s"],
                                                                    abs=1e-3)
        assert r["ratios"][PLAIN]["h1_points"] == pytest.approx(100 * (r["h1"] - rows[PLAIN]["h1"]), abs=0.01)
    assert rows["served_b1"]["h1"] == rows["served_b8"]["h1"]  # batching changes no answer
    assert 0.0 <= rows["served_b8_adaptive"]["extra"]["ot_skipped_share"] <= 1.0
    # The int8 rows: the int8 mention encoder exported beside the cache, the served fp32 export left as it was.
    fp32_dir = linker.settings.encoder.onnx_dir
    assert not any(fp32_dir.glob("*mention*.int8.onnx"))
    assert (tmp_path / "cache" / "onnx-int8" / contract.TEXT_ONLY_MENTION_FILE).with_suffix(".int8.onnx").exists()
    for name in ("served_b8_int8", "served_b8_adaptive_int8"):
        r = rows[name]
        assert r["n"] == 24 and r["mentions_per_s"] > 0 and "int8" in r["what"]
        assert abs(r["h1"] - rows["served_b8"]["h1"]) <= 0.1  # 24 mentions: at most 2 answers apart
    assert rows["ot_ours"]["n"] > 0 and rows["ot_ours"]["extra"]["max_marginal_error"] <= 1e-3
    from models.sinkhorn_numba import AVAILABLE

    assert rows["ot_ours"]["extra"]["backend"] == ("numba" if AVAILABLE else "torch")  # the served solver was timed
    assert rows["ot_pot_sinkhorn"]["ratios"]["ot_ours"]["time"] > 0
    if bench_http.wrk_path() is None:
        assert any("wrk" in s for s in rep["skipped"])
    else:
        http = rows["served_http_c2"]
        assert http["n"] > 0 and http["extra"]["errors"] == 0 and http["extra"]["top1_agreement_with_in_process"] == 1.0
        share = rep["http_share"]
        assert share["concurrency"] == 2 and len(share["rounds"]) == 2
        for r in share["rounds"]:
            assert r["errors"] == 0 and r["in_process_mentions_per_s"] > 0 and r["http_requests_per_s"] > 0
            assert r["share"] == pytest.approx(r["http_requests_per_s"] / r["in_process_mentions_per_s"], abs=2e-3)
        assert min(r["share"] for r in share["rounds"]) <= share["median_share"] <= max(r["share"] for r in share["rounds"])
        assert "HTTP share at concurrency 2" in format_rows(rep)
    assert rep["machine"]["cpus"] and rep["n_mentions"] == 24


@pytest.mark.slow
def test_teacher_row_on_a_small_kg(linker, small_kg, test_mentions, tmp_path: Path) -> None:
    """The teacher row (every KB entity per mention) on a small JSONL KG, its features cached under tmp_path."""
    from service.offline.bench_run import _teacher

    kg = tmp_path / "kg.jsonl"
    kg.write_text("".join(json.dumps({"id": e.id, "name": e.name, "description": e.description,
                                      "image": str(e.image) if e.image else None}) + "\n" for e in small_kg))
    lk = linker.with_weights()
    lk.settings = linker.settings.model_copy(update={
        "features_dir": tmp_path / "features", "index": linker.settings.index.model_copy(update={"kg": str(kg)})})
    row = _teacher(lk, linker.settings.data_dir, test_mentions[:12])
    assert row is not None and row.name == TEACHER and row.n == 12
    assert row.h1 == row.h1_subset and row.h1 >= 0.5 and row.mentions_per_s > 0 and row.cpu_s_per_mention > 0
    assert row.extra["pairs_total"] == 12 * len(small_kg)
    # Every cross term solved for the first 3 gives the same ranks and top entities as the two bounded searches,
    # and costs more than either.
    assert row.extra["exhaustive_n"] == 3 and row.extra["exhaustive_ranks_match"] and row.extra["top1_matches_exhaustive"]
    assert row.mentions_per_s < row.extra["top1_bounded_mentions_per_s"]
    assert row.extra["top1_pairs_solved"] < row.extra["pairs_total"]
