"""The Featurizer on the real exported encoders: block layout and scaling of the global vector, unit-norm
local features with zero padding, and independence from batching."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.features import SEG_FIRST, SEG_PAD, SEG_SECOND, Featurizer, Projections

pytestmark = [pytest.mark.onnx, pytest.mark.slow]

V, W = 0.3, 0.7  # name-view share and image weight: unequal so a swapped block shows
LOCAL, IMAGE_G = 24, 32

ENTITIES = [  # (name, attribute text) in the KG's style
    ("Ada Lovelace", "Sex: female. Birth: 1815, London. Occupation: mathematician, writer."),
    ("Eiffel Tower", "Instance of: lattice tower. Located in: Paris, France. Architect: Stephen Sauvestre."),
    ("Paris", "Instance of: capital city. Country: France."),
    ("Gustave Eiffel", "Sex: male. Birth: 1832, Dijon. Death: 1923, Paris. Occupation: civil engineer, architect."),
]


def _orthonormal(rng: np.random.Generator, d_in: int, d_out: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d_in, d_out)))[0].astype(np.float32)


@pytest.fixture(scope="module")
def projections(runtime) -> Projections:
    rng = np.random.default_rng(0)
    dt, di = runtime.spec.text_dim, runtime.spec.image_dim
    return Projections(
        text_mean=(0.01 * rng.standard_normal(dt)).astype(np.float32), text=_orthonormal(rng, dt, LOCAL),
        image_mean=np.full(di, 0.05, np.float32), image_local=_orthonormal(rng, di, LOCAL),
        image_global=_orthonormal(rng, di, IMAGE_G), name_weight=V, image_weight=W,
    )


@pytest.fixture(scope="module")
def featurizer(runtime, projections) -> Featurizer:
    return Featurizer(runtime, projections)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    yy, xx = np.mgrid[0:150, 0:200]
    rgb = np.stack([xx * 255 / 200, yy * 255 / 150, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    rgb[40:90, 60:140] = (230, 40, 40)
    return Image.fromarray(rgb)


def _encode(featurizer: Featurizer, rows: list[int], images: list[Image.Image | None]):
    return featurizer([ENTITIES[i][0] for i in rows], [ENTITIES[i][1] for i in rows], images)


def test_global_vector_blocks(featurizer, runtime, projections, picture) -> None:
    f = _encode(featurizer, [0, 1, 2], [None, picture, None])
    dt = runtime.spec.text_dim
    assert projections.global_dim == 2 * dt + IMAGE_G
    assert f.global_.shape == (3, projections.global_dim) and f.global_.dtype == np.float32
    pair, name, image = f.global_[:, :dt], f.global_[:, dt : 2 * dt], f.global_[:, 2 * dt :]
    np.testing.assert_allclose(np.linalg.norm(pair, axis=1), np.sqrt(1 - V), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(name, axis=1), np.sqrt(V), atol=1e-5)
    # The blocks are the pair view (name [SEP] attributes) and the name alone, in that order.
    names, attrs = [e[0] for e in ENTITIES[:3]], [e[1] for e in ENTITIES[:3]]
    np.testing.assert_allclose(pair, np.sqrt(1 - V) * runtime.encode_texts(names, attrs).global_, atol=1e-5)
    np.testing.assert_allclose(name, np.sqrt(V) * runtime.encode_texts(names).global_, atol=1e-5)
    # Image block: zero without an image, w * unit vector with one.
    assert f.image_present.tolist() == [False, True, False]
    assert not image[0].any() and not image[2].any()
    assert np.linalg.norm(image[1]) == pytest.approx(W, abs=1e-5)
    np.testing.assert_allclose(np.linalg.norm(f.global_, axis=1) ** 2, [1, 1 + W**2, 1], atol=1e-5)


def test_local_features(featurizer, runtime, picture) -> None:
    f = _encode(featurizer, [0, 1, 2, 3], [None, picture, None, None])
    pair = runtime.encode_texts([e[0] for e in ENTITIES], [e[1] for e in ENTITIES])
    b, t = pair.mask.shape
    assert f.text_local.shape == (b, t, LOCAL) and f.text_local.dtype == np.float32
    assert f.text_seg.shape == (b, t) and f.text_seg.dtype == np.uint8
    # Segments: 1 on name tokens, 2 on attribute tokens, 0 on [CLS]/[SEP]/padding.
    want_seg = np.where(pair.mask, np.where(pair.type_ids == 0, SEG_FIRST, SEG_SECOND), SEG_PAD)
    np.testing.assert_array_equal(f.text_seg, want_seg)
    assert (f.text_seg == SEG_FIRST).any(axis=1).all() and (f.text_seg == SEG_SECOND).any(axis=1).all()
    norms = np.linalg.norm(f.text_local, axis=-1)
    np.testing.assert_allclose(norms[f.text_seg > 0], 1.0, atol=1e-5)
    assert not f.text_local[f.text_seg == 0].any(), "padding and special tokens carry exact zeros"
    assert (~pair.mask).any(axis=1).all()  # every row has some such position
    # Image patches: unit rows when present, all zero when absent.
    assert f.image_local.shape == (b, runtime.spec.image_patches, LOCAL)
    np.testing.assert_allclose(np.linalg.norm(f.image_local[1], axis=-1), 1.0, atol=1e-5)
    assert not f.image_local[[0, 2, 3]].any()


def test_alone_equals_in_batch(featurizer, picture) -> None:
    batch = _encode(featurizer, [0, 1, 2, 3], [None, picture, None, picture])
    for i, im in enumerate([None, picture, None, picture]):
        alone = _encode(featurizer, [i], [im])
        n = alone.text_seg.shape[1]
        assert n <= batch.text_seg.shape[1]
        np.testing.assert_allclose(alone.global_[0], batch.global_[i], atol=1e-4)
        np.testing.assert_array_equal(alone.text_seg[0], batch.text_seg[i, :n])
        np.testing.assert_allclose(alone.text_local[0], batch.text_local[i, :n], atol=1e-4)
        assert not batch.text_local[i, n:].any() and not batch.text_seg[i, n:].any()
        np.testing.assert_allclose(alone.image_local[0], batch.image_local[i], atol=1e-4)
        assert alone.image_present[0] == batch.image_present[i]


def test_projections_round_trip(projections, tmp_path) -> None:
    projections.save(tmp_path / "p.npz")
    back = Projections.load(tmp_path / "p.npz")
    assert (back.global_dim, back.local_dim) == (projections.global_dim, projections.local_dim)
    assert back.name_weight == pytest.approx(V) and back.image_weight == pytest.approx(W)
    for key in ("text_mean", "text", "image_mean", "image_local", "image_global"):
        np.testing.assert_array_equal(getattr(back, key), getattr(projections, key))
