"""The student's ONNX encoders: checker-valid graphs, parity with torch at shapes other than the export's,
the runtime's features equal torch's on real text, the int8 gate, and a refused head/backbone mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from models import contract
from models.backbones import load_backbones
from models.checkpoint import STUDENT_WEIGHTS, read_meta
from models.export import ensure_exported, parity_error, student_encoders

pytestmark = [pytest.mark.onnx, pytest.mark.slow]


@pytest.fixture(scope="module")
def modules():
    return student_encoders(load_backbones("minilm", "efficientnet-lite0", None), STUDENT_WEIGHTS)


def test_shipped_weights_have_a_model_card() -> None:
    meta = read_meta(STUDENT_WEIGHTS)
    assert meta["kind"] == "student" and meta["trained_on"] and meta["date"] and meta["dev_mrr"] > 0.5
    card = (STUDENT_WEIGHTS.parent / "MODEL_CARD.md").read_text()
    for word in ("make train", "WikiMEL", "H@1", "MRR"):
        assert word in card
    assert STUDENT_WEIGHTS.stat().st_size < 5_000_000  # small enough to ship in the repo


@pytest.mark.parametrize("side", ["mention", "entity"])
def test_graph_is_valid_and_matches_torch_at_new_shapes(onnx_dir: Path, modules, side: str) -> None:
    path = onnx_dir / contract.STUDENT_FILES[side]
    onnx.checker.check_model(str(path), full_check=True)
    for batch, tokens in ((1, 5), (3, 17), (7, 40)):  # exported at 2 x 12
        assert parity_error(modules[side], path, batch=batch, tokens=tokens) <= 1e-4


def test_runtime_features_equal_torch_on_real_text(runtime, modules) -> None:
    first, second = ["Douglas Adams", "Paris"], ["The author of the Hitchhiker's Guide.", ""]
    f = runtime.encode_student("mention", first, second, [None, None])
    ids, attn, content, type_ids = runtime.tokenize(first, second)
    spec = runtime.spec
    with torch.no_grad():
        ref = modules["mention"](torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(content),
                                 torch.from_numpy(content & (type_ids == 0)), torch.zeros(2, spec.image_dim),
                                 torch.zeros(2, spec.image_patches, spec.image_dim), torch.zeros(2, dtype=torch.bool))
    np.testing.assert_allclose(f.global_, ref[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(f.text_local, ref[1].numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(f.global_, axis=1), np.sqrt(4 / 6), atol=1e-4)  # 4 unit blocks / sqrt(6)
    assert f.first_mask[1].sum() >= 1 and not (f.first_mask & ~f.text_mask).any()


def test_int8_gate_decides_what_is_served(zeroshot_onnx_dir: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "onnx"
    shutil.copytree(zeroshot_onnx_dir, out)
    spec = ensure_exported(out, text="minilm", image="efficientnet-lite0", clip_path=None, max_tokens=40,
                           image_size=224, heads=STUDENT_WEIGHTS, quantize=True)
    int8 = [out / Path(f).with_suffix(".int8.onnx") for f in contract.STUDENT_FILES.values()]
    if spec.heads.endswith("+int8"):  # passed the gate: the int8 files are there and are what the runtime loads
        assert all(p.exists() for p in int8)
    else:  # failed it: fp32 served, no int8 file left behind
        assert not any(p.exists() for p in int8)
    assert spec.heads.startswith("student@")


def test_heads_for_other_backbone_dims_are_refused(tmp_path: Path) -> None:
    class FakeText(torch.nn.Module):  # unit-test fake: a backbone of another width
        dim = 512

    class FakeBackbones:
        text = FakeText()
        image = None

    with pytest.raises(ValueError, match="EL_ENCODER__HEADS=none"):
        student_encoders(FakeBackbones(), STUDENT_WEIGHTS)  # type: ignore[arg-type]
