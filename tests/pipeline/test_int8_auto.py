"""EL_ENCODER__QUANTIZE_INT8=auto (opt-in; the default is fp32): on CPU the int8 mention encoder (recipe 3), with the
real encoders and index, answering as the fp32 one does; with the CUDA provider, auto keeps fp32."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import models.runtime
from models import contract
from service.pipeline.linker import Linker
from service.pipeline.types import LinkQuery

pytestmark = pytest.mark.slow


def test_auto_serves_the_int8_mention_encoder_on_cpu_with_the_fp32_answers(settings, linker: Linker, test_mentions,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(settings.encoder.onnx_dir, onnx_dir)  # a copy: the int8 export rewrites the spec file
    enc = settings.encoder.model_copy(update={"onnx_dir": onnx_dir, "quantize_int8": "auto"})
    assert enc.int8_mentions()  # this machine has no CUDA provider
    lk = Linker.from_settings(settings.model_copy(update={"encoder": enc}))
    rt = lk.runtime
    assert rt.spec.int8_mentions and rt.spec.heads.endswith(contract.INT8_SUFFIX)
    assert rt.student_sessions["mention"]._model_path.endswith("student_mention.int8.onnx")  # type: ignore[attr-defined]
    assert rt.text_only_sessions["mention"]._model_path.endswith("textonly.int8.onnx")  # type: ignore[attr-defined]
    assert lk.model_version == linker.model_version  # entities are encoded in fp32 either way: the same index serves

    queries = [LinkQuery(m.mention, m.context, None, top_k=5) for m in test_mentions]
    got, ref = lk.link_batch(queries).results, linker.link_batch(queries).results
    top = [(a.entities[0].id, b.entities[0].id) for a, b in zip(got, ref)]
    assert sum(a == b for a, b in top) >= len(top) - 1  # at most one top-1 of 60 moves
    gold = [m.answer for m in test_mentions]
    assert sum(a == g for (a, _), g in zip(top, gold)) >= sum(b == g for (_, b), g in zip(top, gold)) - 1
    diff = [abs(a.entities[0].score - b.entities[0].score) for a, b in zip(got, ref) if a.entities[0].id == b.entities[0].id]
    assert float(np.max(diff)) < 0.02 and float(np.mean(diff)) < 0.005

    monkeypatch.setattr(models.runtime, "picks_cuda", lambda device: True)
    assert not enc.int8_mentions()  # on the CUDA provider, auto serves fp32
    for forced in (True, False):
        assert enc.model_copy(update={"quantize_int8": forced}).int8_mentions() is forced
    assert settings.encoder.quantize_int8 is False  # the default serves fp32
