"""The `el` command end to end: build an index over a user's JSONL KG, evaluate on a slice."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kg_index.load import load_index
from kg_index.manifest import Manifest
from service.offline.evaluation import SystemScores, evaluate, exact_name_ranks, format_table, write_report
from service.pipeline.linker import Linker
from service.pipeline.types import LinkQuery
from service.settings import Settings
from tests.conftest import ROOT


def _write_kg(folder: Path) -> Path:
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "red.png")
    rows = [
        {"id": "acme", "name": "Acme Corporation", "description": "Industry: cartoon anvils. Founded: 1949."},
        {"id": "anvil", "name": "Anvil", "description": "A heavy iron block used in smithing.", "image": "red.png"},
        {"id": "road", "name": "Road Runner", "description": "Species: bird. Creator: Chuck Jones."},
        {"id": "coyote", "name": "Wile E. Coyote", "description": "Species: coyote. Occupation: genius."},
    ]
    path = folder / "kg.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.slow
def test_build_index_over_a_users_jsonl_kg_and_link(tmp_path: Path, onnx_dir: Path) -> None:
    kg = _write_kg(tmp_path)
    out = tmp_path / "index"
    env = {**os.environ, "EL_INDEX__KG": str(kg), "EL_INDEX__DIR": str(out), "EL_ENCODER__ONNX_DIR": str(onnx_dir)}
    proc = subprocess.run([sys.executable, "-m", "service", "build-index"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["entities"] == 4 and summary["images"] == 1 and summary["faiss"] == "Flat"
    index = load_index(out)
    assert index.ids == ["acme", "anvil", "road", "coyote"]
    assert index.manifest.kg == str(kg)

    linker = Linker.from_settings(Settings(encoder={"onnx_dir": onnx_dir}, index={"dir": out, "kg": str(kg)}))
    top = linker.link(LinkQuery("Wile E. Coyote", "The coyote ordered another anvil.", None, top_k=2))
    assert top.entities[0].id == "coyote"
    again = subprocess.run([sys.executable, "-m", "service", "build-index", "--if-missing"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and load_index(out).version == index.version  # nothing rebuilt


@pytest.mark.slow
@pytest.mark.onnx
def test_if_missing_rebuilds_when_the_configured_kg_changed(tmp_path: Path, onnx_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`el build-index --if-missing` (make serve, make eval) keeps an index built from the configured KG and
    rebuilds, saying why in one log line, when the KG file was edited (even in place, same size), another KG
    is configured, or the manifest records no source."""
    from kg_index.source import kg_source
    from service.cli import main

    kg, out = tmp_path / "my_kg.jsonl", tmp_path / "index"
    rows = [{"id": "X1", "name": "Zorvathine Quellmarch", "description": "glass sculptor"},
            {"id": "X2", "name": "Ombrelt Tessavine", "description": "lighthouse keeper"},
            {"id": "X3", "name": "Pellory Vance", "description": "river pilot"}]
    kg.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for var, value in {"EL_INDEX__KG": str(kg), "EL_INDEX__DIR": str(out), "EL_ENCODER__ONNX_DIR": str(onnx_dir)}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("EL_INDEX__ALLOW_SOURCE_MISMATCH", raising=False)
    caplog.set_level(logging.INFO)

    def if_missing() -> tuple[Manifest, int, list[str]]:
        caplog.clear()
        assert main(["build-index", "--if-missing"]) == 0
        lines = [r.getMessage() for r in caplog.records if r.name == "service.cli"]
        return Manifest.read(out), (out / "manifest.json").stat().st_ino, lines

    first, inode, lines = if_missing()
    assert lines == [f"no index at {out}; building the index"]
    assert first.n_entities == 3 and first.kg == str(kg)
    assert first.source["kind"] == "jsonl" and first.source["location"] == str(kg.resolve())
    assert first.source["files"][0]["bytes"] == kg.stat().st_size
    assert first.source["fingerprint"] == kg_source(str(kg), tmp_path).fingerprint

    again, again_inode, lines = if_missing()  # unchanged: kept
    assert again_inode == inode and again.version == first.version
    assert lines == [(f"index {first.version} already at {out}, built from the configured KG (3 entities); "
                      "skipping the build")]

    size = kg.stat().st_size
    kg.write_text(kg.read_text().replace("river pilot", "river guide"))  # edited in place, same size
    assert kg.stat().st_size == size
    edited, edited_inode, lines = if_missing()
    assert edited_inode != inode and edited.source["fingerprint"] != first.source["fingerprint"]
    assert len(lines) == 1 and lines[0].startswith(f"index {first.version} at {out} (3 entities) was built from {kg}")
    assert lines[0].endswith("my_kg.jsonl changed content (same size); building the index")

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(rows[0]) + "\n")
    monkeypatch.setenv("EL_INDEX__KG", str(other))
    monkeypatch.setenv("EL_INDEX__ALLOW_SOURCE_MISMATCH", "true")
    _, kept_inode, _ = if_missing()  # serving another KG on purpose: the index is kept, with a warning
    assert kept_inode == edited_inode
    assert any(r.levelname == "WARNING" and "kept because EL_INDEX__ALLOW_SOURCE_MISMATCH" in r.getMessage()
               for r in caplog.records)
    monkeypatch.delenv("EL_INDEX__ALLOW_SOURCE_MISMATCH")
    swapped, _, lines = if_missing()
    assert swapped.n_entities == 1 and swapped.source["location"] == str(other.resolve())
    assert len(lines) == 1 and f"built from {kg}" in lines[0] and f"configured KG is {other}" in lines[0]
    monkeypatch.setenv("EL_INDEX__KG", str(kg))  # el eval (and bench) refuse it with the message, no traceback
    capsys.readouterr()
    assert main(["eval", "--limit", "1", "--no-teacher"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"el eval: {out / 'manifest.json'}: index {swapped.version} (1 entities) was built from "
                          f"{other}") and "Traceback" not in err
    monkeypatch.setenv("EL_INDEX__KG", str(other))

    raw = json.loads((out / "manifest.json").read_text())
    del raw["source"]  # as written before sources were recorded
    (out / "manifest.json").write_text(json.dumps(raw))
    rebuilt, _, lines = if_missing()
    assert rebuilt.source is not None
    assert len(lines) == 1 and "records no KG source" in lines[0] and lines[0].endswith("; building the index")


@pytest.mark.slow
def test_bad_jsonl_line_fails_the_build_naming_the_line(tmp_path: Path, onnx_dir: Path) -> None:
    kg = tmp_path / "kg.jsonl"
    kg.write_text('{"id": "a", "name": "A"}\n{"id": "b"\n')
    env = {**os.environ, "EL_INDEX__KG": str(kg), "EL_INDEX__DIR": str(tmp_path / "ix"),
           "EL_ENCODER__ONNX_DIR": str(onnx_dir)}
    proc = subprocess.run([sys.executable, "-m", "service", "build-index"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "kg.jsonl" in proc.stderr and "line 2" in proc.stderr
    assert not (tmp_path / "ix").exists()


def test_exact_name_ranks_and_metrics() -> None:
    from kg_index.records import Mention

    ms = [Mention("1", "Paris", "", None, "Q90", "Paris"), Mention("2", "paris", "", None, "Q2", "Paris Hilton"),
          Mention("3", "Nowhere", "", None, "Q5", "x")]
    ranks = exact_name_ranks(ms, ["Q90", "Q2", "Q5"], ["Paris", "Paris", "Somewhere"])
    assert ranks == [1, 2, 0]
    s = SystemScores(3, 3, ranks).summary()
    assert s["h@1"] == pytest.approx(1 / 3, abs=1e-4) and s["h@3"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["mrr"] == pytest.approx((1 + 0.5) / 3, abs=1e-4)


@pytest.mark.slow
def test_evaluate_writes_report_and_plot(linker, mel_dir: Path, tmp_path: Path) -> None:
    report = evaluate(linker, mel_dir, "wikimel", "test", limit=40, teacher=False, skip_margin=0.05)
    assert report["features"] == "student"
    assert set(report["systems"]) == {"exact_name", "retrieval", "retrieval+ot", "retrieval+ot+name",
                                      "retrieval+ot+name+kg", "retrieval+name+kg", "adaptive"}
    served, no_ot, adaptive = (report["systems"][k] for k in ("retrieval+ot+name+kg", "retrieval+name+kg", "adaptive"))
    assert served["ot_skipped_share"] == 0.0 and no_ot["ot_skipped_share"] == 1.0
    assert 0.0 <= adaptive["ot_skipped_share"] <= 1.0
    adds = report["what_ot_adds"]
    assert adds["h1_points"] == round(100 * (served["h@1"] - no_ot["h@1"]), 2) and adds["skip_margin"] == 0.05
    assert adds["adaptive_skipped_share"] == adaptive["ot_skipped_share"]
    for s in report["systems"].values():
        assert s["n_mentions"] == 40 and s["kb_size"] == len(linker.index)
        assert 0.0 <= s["h@1"] <= s["h@3"] <= s["h@5"] <= 1.0 and 0.0 <= s["mrr"] <= 1.0
    # The small index holds every gold entity of these mentions, so retrieval must find most of them.
    assert report["systems"]["retrieval"]["h@5"] >= 0.8
    path, plot = write_report(report, tmp_path)
    assert json.loads(path.read_text())["systems"] == report["systems"]
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert "retrieval+ot" in format_table(report)
    assert path.name == "eval-wikimel-test.json"  # zero-shot reports get a -zeroshot suffix
    # the served confidence's calibration and the NIL rule under the NIL protocol, with a reliability diagram
    cal, nil = report["calibration"], report["nil"]
    assert 0.0 <= cal["ece"] <= 1.0 and sum(b["n"] for b in cal["bins"]) == 40 and cal["in_sample"] is False
    assert nil["n_nil"] > 0 and nil["rule"] == "calibrated" and nil["protocol"]["fraction"] == 0.2
    assert 0.0 <= nil["nil_f1"] <= 1.0 and nil["h@1_answerable"] <= nil["h@1_answerable_ranked"]
    assert "NIL (" in format_table(report) and "confidence: ECE" in format_table(report)
    assert (tmp_path / "eval-wikimel-test-reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert report["mention_encoder"] == "fp32"
    int8, _ = write_report({**report, "mention_encoder": "int8"}, tmp_path)
    assert int8.name == "eval-wikimel-test-int8.json" and path.exists()  # the fp32 report is kept


@pytest.mark.slow
def test_teacher_scores_every_entity_of_the_kb(linker, small_kg, test_mentions, tmp_path: Path) -> None:
    """The teacher row on a small JSONL KG: real teacher weights, features cached under features_dir,
    exact ranks among every KB entity; and the encode timings of teacher and student."""
    from service.offline.evaluation_teacher import encode_timing, teacher_exhaustive

    kg = tmp_path / "kg.jsonl"
    kg.write_text("".join(json.dumps({"id": e.id, "name": e.name, "description": e.description,
                                      "image": str(e.image) if e.image else None}) + "\n" for e in small_kg))
    settings = linker.settings.model_copy(update={
        "features_dir": tmp_path / "features", "index": linker.settings.index.model_copy(update={"kg": str(kg)})})
    lk = linker.with_weights()
    lk.settings = settings
    mentions = test_mentions[:30]
    ranks, ms, info, teacher = teacher_exhaustive(lk, linker.settings.data_dir, "wikimel", "test", mentions)
    assert len(ranks) == len(mentions) and ms > 0
    assert info["kb_entities"] == len(small_kg) and info["pairs_total"] == len(small_kg) * len(mentions)
    # The per-mention time counts encoding the KB once; the scoring alone is part of it.
    assert info["kb_encode_s"] >= 0 and 0 < info["scoring_ms_per_mention"] <= ms
    assert info["mention_encode_ms_per_mention"] > 0  # timed apart: the cache is read, not encoded, in `ms`
    assert all(1 <= r <= len(small_kg) for r in ranks)  # every gold is in this KB
    assert sum(r == 1 for r in ranks) >= 0.7 * len(ranks)  # the trained teacher links most of them
    assert (tmp_path / "features" / "wikimel-test" / "meta.json").exists()
    timing = encode_timing(linker, teacher, mentions, n=12)
    assert timing["n"] == 7 and timing["teacher_head"] > 0 and timing["student_end_to_end"] > 0


@pytest.mark.slow
@pytest.mark.onnx
def test_compact_index_offline_folds_the_change_log(tmp_path: Path, onnx_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Changes made while serving (the change log) are folded into a fresh folder by `el compact-index`, which
    refuses while a server writes the log; the compacted folder still counts as built from the configured KG."""
    from kg_index.live import Change
    from kg_index.load import EntityMeta
    from service.cli import main

    kg, out = _write_kg(tmp_path), tmp_path / "index"
    for var, value in {"EL_INDEX__KG": str(kg), "EL_INDEX__DIR": str(out), "EL_ENCODER__ONNX_DIR": str(onnx_dir)}.items():
        monkeypatch.setenv(var, value)
    assert main(["build-index"]) == 0
    built = Manifest.read(out)
    linker = Linker.from_settings(Settings(), live=True)
    rows = linker.encode_entities([EntityMeta("bugs", "Bugs Bunny", "Species: rabbit.", False)], [None])
    linker.apply_changes([Change("bugs", rows[0]), Change("road", None)])
    capsys.readouterr()
    assert main(["compact-index"]) == 0  # while a serving linker holds the folder: it follows the swap
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["changes"] == 2 and summary["entities"] == 4 and summary["compacted"]
    m = Manifest.read(out)
    assert m.version == summary["index_version"] != built.version and m.compacted["changes"] == 2
    index = load_index(out)
    assert index.ids == ["acme", "anvil", "coyote", "bugs"] and (out / "changes.log").stat().st_size == 0
    linker.sync()  # as each link batch does
    assert linker.index.version == m.version  # the serving linker loaded the compacted folder
    assert linker.link(LinkQuery("Bugs Bunny", "", None, top_k=1)).entities[0].id == "bugs"
    linker.apply_changes([Change("acme", None)])  # and goes on changing it, in the new folder's log
    assert linker.index.version == f"{m.version}+1"
    linker.store.close()
    assert main(["build-index", "--if-missing"]) == 0 and Manifest.read(out).version == m.version  # kept
    top = Linker.from_settings(Settings()).link(LinkQuery("Bugs Bunny", "", None, top_k=1))
    assert top.entities[0].id == "bugs" and top.index_version == m.version
