"""The shallow student mention encoder (models/student.py): what training runs (cached inner-layer states +
the student's tuned layers + head) equals what is exported (the first layers of MiniLM with the tuned weights
swapped in + head), on real tokenised text, in torch and through ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbones import load_backbones
from models.checkpoint import load_model, save_model
from models.export import export_student_encoder, parity_error, student_encoders
from models.feature_cache import InnerLayerText, text_masks
from models.otmel import HeadConfig
from models.student import OTMELStudent, StudentConfig, content_attention, layer_config_of

pytestmark = [pytest.mark.onnx, pytest.mark.slow]

FIRST = ["Douglas Adams", "Paris", "Jordan"]
SECOND = ["The author of The Hitchhiker's Guide to the Galaxy, born in Cambridge.", "", "scored 40 points"]



@pytest.fixture(scope="module")
def backbones():
    return load_backbones("minilm", "efficientnet-lite0", None)


def _shallow_student(bert, mention_layers: int, tuned: int, seed: int = 0) -> OTMELStudent:
    torch.manual_seed(seed)
    cfg = StudentConfig(head=HeadConfig(), mention_layers=mention_layers, tuned_layers=tuned,
                        layer_config=layer_config_of(bert))
    student = OTMELStudent(cfg)
    student.init_tuned_layers(bert.encoder.layer)
    return student.eval()


def test_tuned_layers_must_fit_in_the_mention_layers() -> None:
    with pytest.raises(ValueError, match="tuned_layers"):
        OTMELStudent(StudentConfig(mention_layers=1, tuned_layers=2))


def test_content_attention_is_the_tokenizer_mask(runtime) -> None:
    _, attn, content, _ = runtime.tokenize(FIRST, SECOND)
    assert (attn == 0).any()  # padding is present, so the test can fail
    np.testing.assert_array_equal(content_attention(torch.from_numpy(content)).numpy(), attn.astype(bool))


@torch.no_grad()
def test_tuned_layers_from_minilm_reproduce_its_deeper_states(runtime, backbones) -> None:
    bert = backbones.text.model
    student = _shallow_student(bert, mention_layers=3, tuned=2)
    ids, attn, content, _ = runtime.tokenize(FIRST, SECOND)
    hs = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn), output_hidden_states=True).hidden_states
    inner = InnerLayerText(runtime, bert, 1).encode_texts(FIRST, SECOND)
    np.testing.assert_allclose(inner.tokens, hs[1].numpy(), atol=1e-5)
    out = student.run_tuned_layers(torch.from_numpy(inner.tokens), content_attention(torch.from_numpy(content)))
    real = torch.from_numpy(attn).bool()
    torch.testing.assert_close(out[real], hs[3][real], atol=1e-4, rtol=0)


def test_exported_shallow_mention_encoder_equals_the_training_path(runtime, backbones, tmp_path: Path) -> None:
    bert = backbones.text.model
    student = _shallow_student(bert, mention_layers=2, tuned=1, seed=3)
    with torch.no_grad():  # move the tuned layer off MiniLM's own, so a wrong swap shows
        for p in student.mention_layers.parameters():
            p.add_(0.02 * torch.randn_like(p))
    weights = tmp_path / "student.pt"
    save_model(student, weights, {"kind": "student"})
    student = load_model(weights)  # fp16 round trip, as shipped
    modules = student_encoders(backbones, weights)
    mention = modules["mention"]
    assert len(mention.backbone.model.encoder.layer) == 2 and len(modules["entity"].backbone.model.encoder.layer) == 6
    assert len(backbones.text.model.encoder.layer) == 6  # the shared backbone is left whole

    ids, attn, content, type_ids = runtime.tokenize(FIRST, SECOND)
    first = content & (type_ids == 0)
    n, spec = len(FIRST), runtime.spec
    images = (torch.zeros(n, spec.image_dim), torch.zeros(n, spec.image_patches, spec.image_dim), torch.zeros(n, dtype=torch.bool))
    tokens, text_mask, first_mask = text_masks(InnerLayerText(runtime, bert, 1), FIRST, SECOND, spec.max_tokens)
    with torch.no_grad():
        exported = mention(torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(content),
                           torch.from_numpy(first), *images)
        trained = student.encode_mentions(torch.from_numpy(tokens), torch.from_numpy(text_mask),
                                          torch.from_numpy(first_mask), *images)
    torch.testing.assert_close(exported[0], trained.retrieval_vector(), atol=1e-4, rtol=0)
    t = ids.shape[1]
    torch.testing.assert_close(exported[1], trained.text_local[:, :t], atol=1e-4, rtol=0)

    path = tmp_path / "mention.onnx"
    export_student_encoder(mention, path)
    assert parity_error(mention, path, batch=3, tokens=17) <= 1e-4


@torch.no_grad()
def test_layer_zero_states_are_the_embeddings(runtime, backbones) -> None:
    """Two tuned layers of two train on layer-0 states: the embeddings, as the whole model sees them."""
    bert = backbones.text.model
    ids, attn, _, _ = runtime.tokenize(FIRST, SECOND)
    hs = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(InnerLayerText(runtime, bert, 0).encode_texts(FIRST, SECOND).tokens, hs[0].numpy(), atol=1e-6)
