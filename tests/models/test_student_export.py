"""The student's ONNX encoders: checker-valid graphs, parity with torch at shapes other than the export's,
the runtime's features equal torch's on real text, the int8 gate, and a refused head/backbone mismatch."""

from __future__ import annotations

import dataclasses
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
    # Small enough to ship in the repo: the heads (~2.7 MB in fp16) plus any fine-tuned backbone layers (~3.5 MB each).
    limit = 3_000_000 + 3_600_000 * meta["config"].get("tuned_layers", 0)
    assert STUDENT_WEIGHTS.stat().st_size < limit


def test_mention_graph_runs_the_students_layers_only(onnx_dir: Path) -> None:
    """A shallow student's mention graph holds its own number of backbone layers; the entity graph all of them."""
    layers = read_meta(STUDENT_WEIGHTS)["config"].get("mention_layers", 0) or 6

    def depth(side: str) -> int:
        names = {n.name for n in onnx.load(str(onnx_dir / contract.STUDENT_FILES[side])).graph.node}
        return len({i for i in range(12) if any(f"/layer.{i}/" in n for n in names)})

    assert depth("mention") == layers and depth("entity") == 6


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


@pytest.mark.parametrize("side", ["mention", "entity"])
def test_a_batch_encoded_in_length_bands_equals_each_row_alone(runtime, side: str) -> None:
    """Rows of many lengths in one call are run in length bands; every row's features are what it gets alone,
    padding included (zeros past its content)."""
    from PIL import Image

    text = "the author of a guide to the galaxy who was born in cambridge and wrote radio plays and novels"
    words = text.split()
    first = [f"Name {i}" for i in range(12)]
    second = [" ".join(words[: (i * 7) % len(words)]) for i in range(12)]
    images = [Image.new("RGB", (40, 30), (i * 20, 90, 200)) if i % 3 == 0 else None for i in range(12)]
    lengths = runtime.tokenize(first, second)[1].sum(axis=1)
    assert len(set(lengths.tolist())) >= 8  # the bands are exercised
    batch = runtime.encode_student(side, first, second, images)
    for i in range(12):
        alone = runtime.encode_student(side, first[i:i + 1], second[i:i + 1], images[i:i + 1])
        t = alone.text_local.shape[1]
        np.testing.assert_allclose(batch.global_[i], alone.global_[0], atol=1e-5)
        np.testing.assert_allclose(batch.text_local[i, :t], alone.text_local[0], atol=1e-5)
        assert not batch.text_local[i, t:].any()
        np.testing.assert_allclose(batch.image_local[i], alone.image_local[0], atol=1e-5)
        np.testing.assert_allclose(batch.g_text[i], alone.g_text[0], atol=1e-5)
        np.testing.assert_allclose(batch.g_image[i], alone.g_image[0], atol=1e-5)


def test_text_only_mention_graph_gives_the_full_graphs_features_without_image_inputs(runtime, onnx_dir: Path) -> None:
    """Runs with no image go through student_mention.textonly.onnx (no image inputs, the blank image folded in);
    its features are the full graph's, and a run with an image still takes the full graph."""
    from PIL import Image

    path = onnx_dir / contract.TEXT_ONLY_MENTION_FILE
    onnx.checker.check_model(str(path), full_check=True)
    assert [i.name for i in onnx.load(str(path)).graph.input] == list(contract.TEXT_ONLY_INPUTS)
    first = ["Douglas Adams", "Paris", "Mercury", "Queen", "Jordan"]
    second = ["The author of the Hitchhiker's Guide.", "", "closest planet to the sun", "a rock band", "the river"]
    runs = {"full": 0, "text": 0}

    class Counting:
        def __init__(self, sess, key: str) -> None:
            self.sess, self.key = sess, key

        def run(self, *args, **kwargs):
            runs[self.key] += 1
            return self.sess.run(*args, **kwargs)

    full, text_only = runtime.student_sessions["mention"], runtime.text_only_sessions["mention"]
    try:
        runtime.student_sessions["mention"] = Counting(full, "full")
        runtime.text_only_sessions["mention"] = Counting(text_only, "text")
        fast = runtime.encode_student("mention", first, second, [None] * 5)
        assert runs == {"full": 0, "text": 1}
        runtime.text_only_sessions.clear()
        slow = runtime.encode_student("mention", first, second, [None] * 5)
        assert runs == {"full": 1, "text": 1}
        runtime.text_only_sessions["mention"] = Counting(text_only, "text")
        runtime.encode_student("mention", first[:1], second[:1], [Image.new("RGB", (40, 30), (20, 90, 200))])
        assert runs == {"full": 2, "text": 1}
    finally:
        runtime.student_sessions["mention"], runtime.text_only_sessions["mention"] = full, text_only
    for a, b in zip(dataclasses.astuple(fast), dataclasses.astuple(slow)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not fast.image_present.any()


def test_an_export_without_the_text_only_graph_is_served_and_then_completed(runtime, onnx_dir: Path,
                                                                           tmp_path: Path) -> None:
    """An export made before the text-only graph existed: the runtime serves every run through the full graph (the
    same features), and the next `ensure_exported` adds the missing file."""
    import shutil

    from models.runtime import EncoderRuntime

    old = tmp_path / "onnx"
    shutil.copytree(onnx_dir, old, ignore=shutil.ignore_patterns(contract.TEXT_ONLY_MENTION_FILE))
    rt = EncoderRuntime(old, device="cpu")
    assert rt.text_only_sessions == {}
    first, second = ["Douglas Adams", "Mercury"], ["The author of the Hitchhiker's Guide.", "closest planet"]
    got, ref = (r.encode_student("mention", first, second, [None, None]) for r in (rt, runtime))
    for a, b in zip(dataclasses.astuple(got), dataclasses.astuple(ref)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    ensure_exported(old, text="minilm", image="efficientnet-lite0", clip_path=None, max_tokens=40, image_size=224,
                    heads=STUDENT_WEIGHTS)
    assert (old / contract.TEXT_ONLY_MENTION_FILE).exists()
    assert "mention" in EncoderRuntime(old, device="cpu").text_only_sessions


def _export_int8(onnx_dir: Path, out: Path) -> contract.EncoderSpec:
    import shutil

    shutil.copytree(onnx_dir, out)
    return ensure_exported(out, text="minilm", image="efficientnet-lite0", clip_path=None, max_tokens=40,
                           image_size=224, heads=STUDENT_WEIGHTS, quantize=True)


def test_int8_mention_encoder_passes_the_gate_and_is_served(onnx_dir: Path, tmp_path: Path) -> None:
    from models.runtime import EncoderRuntime

    out = tmp_path / "onnx"
    spec = _export_int8(onnx_dir, out)
    fp32 = contract.EncoderSpec.from_json((onnx_dir / contract.SPEC_FILE).read_text())
    assert spec.heads.startswith("student@") and spec.heads.endswith(contract.INT8_SUFFIX)
    mention, entity = (out / contract.STUDENT_FILES[s] for s in ("mention", "entity"))
    assert mention.with_suffix(".int8.onnx").exists() and not entity.with_suffix(".int8.onnx").exists()
    # The entity side is unchanged, so an index built with fp32 encoders stays valid.
    assert fp32.heads == spec.heads.removesuffix(contract.INT8_SUFFIX) and spec.signature() == fp32.signature()

    rt = EncoderRuntime(out, device="cpu")
    assert rt.student_sessions["mention"]._model_path.endswith(".int8.onnx")  # type: ignore[attr-defined]
    assert rt.student_sessions["entity"]._model_path.endswith("student_entity.onnx")  # type: ignore[attr-defined]
    assert rt.text_only_sessions["mention"]._model_path.endswith("textonly.int8.onnx")  # type: ignore[attr-defined]
    # Recipe 3: the output projections (attention and FFN) stay fp32 MatMuls, the other backbone products are int8.
    for path in (mention, out / contract.TEXT_ONLY_MENTION_FILE):
        nodes = onnx.load(str(path.with_suffix(".int8.onnx")), load_external_data=False).graph.node
        kept = [n for n in nodes if "/output/dense/" in n.name and n.op_type == "MatMul"]
        assert len(kept) == 4  # 2 layers x (attention output, FFN output)
        assert not [n for n in nodes if "/output/dense/" in n.name and n.op_type in QUANTISED_OPS]
        assert sum(n.op_type == "MatMulInteger" for n in nodes) >= 8  # query, key, value, FFN up of both layers
    names = ["Douglas Adams", "Ada Lovelace", "Mercury", "Queen"]
    texts = ["English author of The Hitchhiker's Guide to the Galaxy", "English mathematician, first programmer",
             "planet closest to the Sun", "British rock band formed in London in 1970"]
    m = rt.encode_student("mention", names, texts, [None] * 4).global_
    e = rt.encode_student("entity", names, texts, [None] * 4).global_
    assert ((m @ e.T).argmax(1) == np.arange(4)).all()  # int8 mentions still find their own entity

    # Exports of the older recipes ("+int8.2": the output projections quantised; "+int8": the head too) are redone.
    old = contract.EncoderSpec.from_json((out / contract.SPEC_FILE).read_text())
    for legacy in contract.LEGACY_INT8_SUFFIXES:
        old = dataclasses.replace(old, heads=old.heads.removesuffix(contract.INT8_SUFFIX) + legacy)
        assert old.signature() == fp32.signature()
        (out / contract.SPEC_FILE).write_text(old.to_json())
        stamp = mention.with_suffix(".int8.onnx").stat().st_mtime_ns
        again = ensure_exported(out, text="minilm", image="efficientnet-lite0", clip_path=None, max_tokens=40,
                                image_size=224, heads=STUDENT_WEIGHTS, quantize=True)
        assert again.heads == spec.heads and mention.with_suffix(".int8.onnx").stat().st_mtime_ns != stamp
        old = again


QUANTISED_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "ConvInteger"}


def test_int8_encoder_keeps_its_head_in_fp32_and_the_gate_refuses_one_that_does_not(onnx_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """The quantiser turns the head's Gemms into MatMuls before it quantises, under new names: excluding the head
    by its graph names alone quantised its image projections, which bent the fusion units of every text-only
    retrieval vector (cosine to fp32 about 0.55) and cost up to 1.8 points of retrieval H@1."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from models.export import int8_gate, quantize_student_encoder

    spec = contract.EncoderSpec.from_json((onnx_dir / contract.SPEC_FILE).read_text())
    tok = onnx_dir / spec.tokenizer
    src = onnx_dir / contract.STUDENT_FILES["entity"]
    good = tmp_path / "entity.int8.onnx"
    quantize_student_encoder(src, good)
    nodes = onnx.load(str(good), load_external_data=False).graph.node
    assert any(n.op_type in QUANTISED_OPS for n in nodes)  # the backbone is int8
    assert not [n.name for n in nodes if "/head" in n.name and n.op_type in QUANTISED_OPS]  # the head is not
    assert int8_gate("entity", onnx_dir, good, tok, spec.image_dim, spec.image_patches, spec.heads_dim)

    bad = tmp_path / "entity.head-int8.onnx"  # the old exclusion list: the head's names as they are in the graph
    head = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.name.startswith("/head")]
    quantize_dynamic(str(src), str(bad), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=head, extra_options={"MatMulConstBOnly": True})
    assert [n.name for n in onnx.load(str(bad), load_external_data=False).graph.node
            if "/head" in n.name and n.op_type in QUANTISED_OPS]
    assert not int8_gate("entity", onnx_dir, bad, tok, spec.image_dim, spec.image_patches, spec.heads_dim)


def test_int8_gate_refusal_leaves_fp32_served(onnx_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import models.export

    monkeypatch.setattr(models.export, "INT8_MIN_SCORE_CORRELATION", 1.01)  # a gate nothing passes
    out = tmp_path / "onnx"
    spec = _export_int8(onnx_dir, out)
    assert spec.heads.startswith("student@") and not spec.heads.endswith(contract.INT8_SUFFIX)
    assert not list(out.glob("*.int8.onnx"))


def test_heads_for_other_backbone_dims_are_refused(tmp_path: Path) -> None:
    class FakeText(torch.nn.Module):  # unit-test fake: a backbone of another width
        dim = 512

    class FakeBackbones:
        text = FakeText()
        image = None

    with pytest.raises(ValueError, match="EL_ENCODER__HEADS=none"):
        student_encoders(FakeBackbones(), STUDENT_WEIGHTS)  # type: ignore[arg-type]
