"""The index built with the trained student's entity encoder (the served default): files, dims, unit
globals, the blank image, and that re-encoding an entity reproduces what the index stored."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kg_index.build import build_index, load_entity_image
from kg_index.load import load_index
from kg_index.manifest import STUDENT_INDEX_FILES, IndexIntegrityError, Manifest
from models.features import StudentFeaturizer

pytestmark = [pytest.mark.onnx, pytest.mark.slow]


@pytest.fixture(scope="module")
def entities(small_kg):
    with_img = [e for e in small_kg if e.image is not None][:2]
    return with_img + [e for e in small_kg if e.image is None][:30]


@pytest.fixture(scope="module")
def built(entities, runtime, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("student-index") / "idx"
    build_index(entities, runtime, out, kg="mel-slice", progress=False, batch_size=16)
    return out


def test_student_index_round_trip(built: Path, entities, runtime) -> None:
    index = load_index(built, encoder_signature=runtime.spec.signature())
    m, d = index.manifest, runtime.spec.heads_dim
    assert m.heads == runtime.spec.heads and m.heads.startswith("student@")
    assert set(m.files) == set(STUDENT_INDEX_FILES) and not (built / "projections.npz").exists()
    assert (m.local_dim, m.global_dim, index.faiss_index.d) == (d, 4 * d, 4 * d)
    assert index.projections is None
    assert index.unit_globals.shape == (len(entities), 2, d)
    assert index.image_blank.shape == (m.image_patches, d)
    assert m.n_images == sum(e.image is not None for e in entities) == index.n_image_rows
    # Unit globals and local features are unit vectors (zeros on padding).
    np.testing.assert_allclose(np.linalg.norm(index.unit_globals.astype(np.float32), axis=-1), 1.0, atol=2e-3)
    norms = np.linalg.norm(index.text_local.astype(np.float32), axis=-1)
    real = index.text_seg > 0
    np.testing.assert_allclose(norms[real], 1.0, atol=2e-3)
    assert np.all(norms[~real] == 0)

    # Re-encoding reproduces the stored vectors; each entity finds itself first.
    feat = StudentFeaturizer(runtime, "entity")
    rows = [0, 1, 5, len(entities) - 1]
    f = feat([entities[r].name for r in rows], [entities[r].description for r in rows],
             [load_entity_image(entities[r].image) for r in rows])
    stored = index.faiss_index.reconstruct_n(0, len(entities))
    np.testing.assert_allclose(f.global_, stored[rows], atol=1e-4)
    np.testing.assert_allclose(f.unit_globals, index.unit_globals[rows].astype(np.float32), atol=2e-3)
    _, hits = index.search(f.global_, 3)
    assert hits[:, 0].tolist() == rows
    # An entity without an image carries the blank image's patches.
    no_img = f.image_present == False
    np.testing.assert_allclose(f.image_local[no_img][0], index.image_blank.astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("name", ["unit_globals.npy", "image_blank.npy"])
def test_missing_student_file_is_refused(built: Path, tmp_path: Path, name: str) -> None:
    dst = tmp_path / "idx"
    shutil.copytree(built, dst)
    (dst / name).unlink()
    with pytest.raises(IndexIntegrityError, match=name):
        load_index(dst)


def test_zero_shot_runtime_refuses_a_student_index(built: Path, zeroshot_runtime) -> None:
    assert Manifest.read(built).encoder_signature != zeroshot_runtime.spec.signature()
    with pytest.raises(IndexIntegrityError, match="rebuild the index"):
        load_index(built, encoder_signature=zeroshot_runtime.spec.signature())
