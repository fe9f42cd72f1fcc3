"""EL_UPDATES__INT8_ENCODER with the real encoders and index: the update worker makes (once) and loads the int8
entity encoder, a new entity encoded by it is found and reranked first, and its vectors stay close to what the
fp32 index build would give it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from kg_index.live import Change
from kg_index.load import EntityMeta
from models import contract
from models.export import INT8_STAMP_KEY, ensure_int8_entity_encoder
from service.offline.bench_updates import private_copy
from service.pipeline.linker import Linker
from service.pipeline.types import LinkQuery

pytestmark = pytest.mark.slow

NAME, DESCRIPTION = "Zorblax Quintavian", "Occupation: painter. Birth: 1890. Citizenship: Venus."


def linked_copy(src: Path, dst: Path) -> Path:
    """The export folder, its files hard-linked (none is rewritten in place): the int8 file lands in the copy."""
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)
    return dst


def test_the_int8_update_encoder_is_made_once_and_links_a_new_entity(settings, small_index: Path, linker: Linker,
                                                                     tmp_path: Path) -> None:
    onnx_dir = linked_copy(settings.encoder.onnx_dir, tmp_path / "onnx")
    folder = tmp_path / "index"
    private_copy(small_index, folder)
    s = settings.model_copy(update={
        "encoder": settings.encoder.model_copy(update={"onnx_dir": onnx_dir}),
        "index": settings.index.model_copy(update={"dir": folder}),
        "updates": settings.updates.model_copy(update={"int8_encoder": True, "compact_after": 0})})
    lk = Linker.from_settings(s, live=True)
    try:
        runtime = lk.entity_runtime()
        int8 = onnx_dir / Path(contract.STUDENT_FILES["entity"]).with_suffix(".int8.onnx")
        assert runtime.student_sessions["entity"]._model_path == str(int8)  # type: ignore[attr-defined]
        assert lk.runtime.student_sessions["entity"]._model_path.endswith("student_entity.onnx")  # type: ignore[attr-defined]
        # Made once, stamped with the export it came from: the next server start reuses it ...
        made = int8.stat().st_mtime_ns
        assert ensure_int8_entity_encoder(onnx_dir) == int8 and int8.stat().st_mtime_ns == made
        # ... and one stamped for another export (or recipe) is made again.
        model = onnx.load(str(int8))
        onnx.helper.set_model_props(model, {INT8_STAMP_KEY: "another-export"})
        onnx.save(model, str(int8))
        assert ensure_int8_entity_encoder(onnx_dir) == int8
        assert {p.key: p.value for p in onnx.load(str(int8), load_external_data=False).metadata_props}[
            INT8_STAMP_KEY] != "another-export"

        meta = EntityMeta("live:zorblax", NAME, DESCRIPTION, False, changed=True)
        (row,) = lk.encode_entities([meta], [None])
        fp32 = linker.runtime.encode_student("entity", [NAME], [DESCRIPTION], [None]).global_[0]
        got = lk.entity_runtime().encode_student("entity", [NAME], [DESCRIPTION], [None]).global_[0]
        cos = float(fp32 @ got / np.linalg.norm(fp32) / np.linalg.norm(got))
        assert 0.98 <= cos < 1.0  # close to fp32, and really another model
        lk.apply_changes([Change(meta.id, row)])
        top = lk.link(LinkQuery(NAME, f"{NAME}, the Venusian painter, in his studio in 1931.", None, top_k=5))
        assert top.entities[0].id == "live:zorblax"
    finally:
        if lk.store is not None:
            lk.store.close()


def test_an_int8_encoder_that_cannot_be_made_leaves_changes_in_fp32(settings, small_index: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import models.export

    def refuse(onnx_dir: Path) -> Path:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(models.export, "ensure_int8_entity_encoder", refuse)
    s = settings.model_copy(update={"updates": settings.updates.model_copy(update={"int8_encoder": True})})
    lk = Linker.from_settings(s)  # not live: the update encoder alone
    runtime = lk.entity_runtime()
    assert runtime is not lk.runtime
    assert runtime.student_sessions["entity"]._model_path.endswith("student_entity.onnx")  # type: ignore[attr-defined]
    assert "cannot make the int8 entity encoder" in caplog.text
    (row,) = lk.encode_entities([EntityMeta("live:x", NAME, DESCRIPTION, False, changed=True)], [None])
    assert row is not None
