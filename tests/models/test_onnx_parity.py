"""ONNX export parity: the exported encoders match the torch backbones at shapes other than the export shapes.

The export traced batch 2 x 12 tokens (text) and batch 2 (image); a reshape baked in by the tracer would
only show at other batch sizes and lengths, so every check here uses other ones, with real padding masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import contract

pytestmark = [pytest.mark.onnx, pytest.mark.slow]

ATOL = 1e-4  # fp32, absolute
PROSE = (
    "Ada Lovelace was an English mathematician and writer, chiefly known for her work on Charles Babbage's "
    "proposed mechanical general-purpose computer, the Analytical Engine. She was the first to recognise that "
    "the machine had applications beyond pure calculation, and she published the first algorithm intended to be "
    "carried out by such a machine. The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in "
    "Paris, France, named after the engineer Gustave Eiffel, whose company designed and built the tower."
)


@pytest.fixture(scope="module")
def backbones():
    from models.backbones import load_backbones

    return load_backbones("minilm", "efficientnet-lite0", None)


@pytest.fixture(scope="module")
def raw_tokenizer(onnx_dir: Path):
    """The exported tokenizer without the runtime's truncation and padding settings."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))


def padded_batch(tokenizer, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """[batch, length] ids and attention mask of real text: row 0 fills `length`, later rows are shorter
    (so they carry real right padding), each row `[CLS] words... [SEP]` from a different offset of PROSE."""
    words = tokenizer.encode(PROSE, add_special_tokens=False).ids
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros((batch, length), np.int64)
    for i in range(batch):
        n = length if i == 0 else max(3, length - (i * length) // (batch + 1))
        body = words[7 * i : 7 * i + n - 2]
        row = [cls, *body, sep]
        ids[i, :n], mask[i, :n] = row, 1
    assert mask[:, -1].any() and (batch == 1 or not mask.all()), "want both full rows and padded rows"
    return ids, mask


def torch_text(backbones, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        g, t = backbones.text(torch.from_numpy(ids), torch.from_numpy(mask))
    return g.numpy(), t.numpy()


def synthetic_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Smooth gradients plus noise and a bright square, different sizes, so resizing is exercised too."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 180 + 37 * i, 260 - 21 * i
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255], axis=-1)
        img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255)
        img[h // 4 : h // 2, w // 3 : w // 2] = 250 - 40 * i
        out.append(Image.fromarray(img.astype(np.uint8)))
    return out


def test_onnx_files_pass_checker(onnx_dir: Path) -> None:
    import onnx

    for name in (contract.TEXT_FILE, contract.IMAGE_FILE):
        onnx.checker.check_model(str(onnx_dir / name), full_check=True)
        model = onnx.load(str(onnx_dir / name))
        assert [i.name for i in model.graph.input] == list(
            contract.TEXT_INPUTS if name == contract.TEXT_FILE else contract.IMAGE_INPUTS
        )
        assert [o.name for o in model.graph.output] == list(
            contract.TEXT_OUTPUTS if name == contract.TEXT_FILE else contract.IMAGE_OUTPUTS
        )


@pytest.mark.parametrize("length", [7, 29, 40])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_text_encoder_parity(backbones, runtime, raw_tokenizer, batch: int, length: int) -> None:
    ids, mask = padded_batch(raw_tokenizer, batch, length)
    want_g, want_t = torch_text(backbones, ids, mask)
    got_g, got_t = runtime.text_session.run(list(contract.TEXT_OUTPUTS), {"input_ids": ids, "attention_mask": mask})
    assert got_g.shape == (batch, runtime.spec.text_dim) and got_g.dtype == np.float32
    assert got_t.shape == (batch, length, runtime.spec.text_dim) and got_t.dtype == np.float32
    att = mask.astype(bool)
    assert np.abs(got_g - want_g).max() <= ATOL
    assert np.abs(got_t[att] - want_t[att]).max() <= ATOL
    np.testing.assert_allclose(np.linalg.norm(got_g, axis=1), 1.0, atol=1e-5)  # pooled vector is L2-normalised


def test_text_padding_does_not_leak(runtime, raw_tokenizer) -> None:
    """A row's outputs do not depend on how far the batch pads it (the mask reaches attention and pooling)."""
    ids, mask = padded_batch(raw_tokenizer, 3, 29)
    g_batch, t_batch = runtime.text_session.run(None, {"input_ids": ids, "attention_mask": mask})
    for i in range(3):
        n = int(mask[i].sum())
        g1, t1 = runtime.text_session.run(None, {"input_ids": ids[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]})
        assert np.abs(g1[0] - g_batch[i]).max() <= ATOL
        assert np.abs(t1[0] - t_batch[i, :n]).max() <= ATOL


@pytest.mark.parametrize("batch", [1, 3])
def test_image_encoder_parity(backbones, runtime, batch: int) -> None:
    pixels = runtime.preprocess(synthetic_images(batch, seed=batch))
    assert pixels.shape == (batch, 3, 224, 224) and pixels.dtype == np.float32
    assert -1.01 <= pixels.min() and pixels.max() <= 1.01  # EfficientNet-Lite's (x - 127) / 128
    with torch.no_grad():
        want_g, want_p = (x.numpy() for x in backbones.image(torch.from_numpy(pixels)))
    got_g, got_p = runtime.image_session.run(list(contract.IMAGE_OUTPUTS), {"pixels": pixels})
    assert got_g.shape == (batch, 1280) and got_p.shape == (batch, 49, 1280)
    # The map is the head conv after ReLU6 (Lite): values in [0, 6], most of them exactly 0, so 1e-4 absolute
    # is meaningful on this scale; the per-patch relative error guards the large entries as well.
    assert want_p.min() >= 0.0 and 1.0 < want_p.max() <= 6.0 + 1e-6
    assert np.abs(got_g - want_g).max() <= ATOL
    assert np.abs(got_p - want_p).max() <= ATOL
    norms = np.linalg.norm(want_p, axis=-1)
    live = norms > 1e-3
    assert (np.linalg.norm(got_p - want_p, axis=-1)[live] / norms[live]).max() <= 1e-4


def test_encode_images_matches_torch_and_marks_missing(backbones, runtime) -> None:
    images = synthetic_images(2, seed=7)
    feats = runtime.encode_images([images[0], None, images[1]])
    assert feats.present.tolist() == [True, False, True]
    assert not feats.global_[1].any() and not feats.patches[1].any()
    with torch.no_grad():
        want_g, want_p = (x.numpy() for x in backbones.image(torch.from_numpy(runtime.preprocess(images))))
    assert np.abs(feats.global_[[0, 2]] - want_g).max() <= ATOL
    assert np.abs(feats.patches[[0, 2]] - want_p).max() <= ATOL


def test_encode_images_in_chunks_matches_one_at_a_time(runtime) -> None:
    """More images than IMAGE_CHUNK, with gaps: every present image lands in its own row, as if encoded alone."""
    from models.runtime import IMAGE_CHUNK

    images = synthetic_images(2 * IMAGE_CHUNK + 1, seed=11)
    mixed = [images[0], None, *images[1:5], None, *images[5:]]
    feats = runtime.encode_images(mixed)
    assert feats.present.tolist() == [im is not None for im in mixed]
    for i, im in enumerate(mixed):
        if im is None:
            assert not feats.global_[i].any() and not feats.patches[i].any()
            continue
        alone = runtime.encode_images([im])
        assert np.abs(feats.global_[i] - alone.global_[0]).max() <= ATOL
        assert np.abs(feats.patches[i] - alone.patches[0]).max() <= ATOL


def test_encode_texts_masks_and_type_ids(backbones, runtime, raw_tokenizer) -> None:
    first = ["Eiffel Tower", "Ada Lovelace", "Paris"]
    second = ["wrought-iron lattice tower in Paris", "English mathematician and writer, Analytical Engine", "city"]
    f = runtime.encode_texts(first, second)
    ids, attn, content, type_ids = runtime.tokenize(first, second)
    cls, sep, pad = (raw_tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    b, t = ids.shape
    assert f.tokens.shape == (b, t, runtime.spec.text_dim) and f.global_.shape == (b, runtime.spec.text_dim)
    np.testing.assert_array_equal(f.mask, content)
    np.testing.assert_array_equal(f.type_ids, type_ids)
    assert t < 40 and not attn.all(), "rows of different lengths: the batch is padded"
    for i in range(b):
        row, m, ty = ids[i], f.mask[i], f.type_ids[i]
        n = int(attn[i].sum())
        # [CLS] a... [SEP] b... [SEP] [PAD]...
        assert row[0] == cls and row[n - 1] == sep and (row[n:] == pad).all()
        seps = np.flatnonzero(row == sep)
        assert len(seps) == 2 and seps[1] == n - 1
        assert not m[0] and not m[seps].any() and not m[n:].any(), "mask excludes [CLS]/[SEP]/padding"
        assert m[1 : seps[0]].all() and m[seps[0] + 1 : n - 1].all(), "and keeps every content token"
        assert (ty[: seps[0] + 1] == 0).all() and (ty[seps[0] + 1 : n] == 1).all() and (ty[n:] == 0).all()
        assert raw_tokenizer.decode(row[m & (ty == 0)].tolist()) == first[i].lower()
        assert raw_tokenizer.decode(row[m & (ty == 1)].tolist()).replace(" - ", "-").replace(" ,", ",") == second[i].lower()
    # The runtime's outputs are the torch backbone's for the same tokens.
    want_g, want_t = torch_text(backbones, ids, attn)
    assert np.abs(f.global_ - want_g).max() <= ATOL
    assert np.abs(f.tokens[attn.astype(bool)] - want_t[attn.astype(bool)]).max() <= ATOL


def test_encode_texts_single_and_truncation(runtime) -> None:
    single = runtime.encode_texts(["Ada Lovelace", "Gustave Eiffel, engineer"])
    assert (single.type_ids == 0).all()
    assert single.mask.sum(1).tolist() == [3, 6]  # ada love ##lace / gustave e ##iff ##el , engineer
    pair = runtime.encode_texts(["Ada Lovelace"], [PROSE])  # long context: truncated to the token budget
    assert pair.tokens.shape[1] == runtime.spec.max_tokens
    assert pair.mask[0].sum() == runtime.spec.max_tokens - 3
    assert (pair.type_ids[0, 1:4] == 0).all(), "the surface survives truncation; only the context is cut"
    empty = runtime.encode_texts([])
    assert empty.global_.shape == (0, runtime.spec.text_dim)


def test_encode_texts_long_single_text_is_truncated(runtime) -> None:
    f = runtime.encode_texts([PROSE])
    assert f.tokens.shape[1] == runtime.spec.max_tokens


def test_encode_texts_long_first_text_of_pair_is_truncated(runtime) -> None:
    f = runtime.encode_texts([PROSE, "Paris"], ["a sentence", "capital of France"])
    assert f.tokens.shape[1] == runtime.spec.max_tokens


def test_preprocess_is_the_normalisation_formula_bit_for_bit(runtime) -> None:
    """The table lookup gives exactly ((v / 255) - mean) / std in float32, as computed over whole arrays (what the
    index was built with): the same bits, so no feature moves. A greyscale and an RGBA image are converted first."""
    images = [*synthetic_images(3, seed=5), synthetic_images(1, seed=6)[0].convert("L"),
              synthetic_images(1, seed=7)[0].convert("RGBA")]
    got = runtime.preprocess(images)
    size = runtime.spec.image_size
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
                    for im in images]).transpose(0, 3, 1, 2) / 255.0
    mean = np.asarray(runtime.spec.pixel_mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(runtime.spec.pixel_std, np.float32).reshape(1, 3, 1, 1)
    want = ((arr - mean) / std).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == (5, 3, size, size) and got.flags.c_contiguous
    assert np.array_equal(got, want)
    assert len(np.unique(got[:, 0])) > 200  # the images use most of the range: the table is exercised
