"""Turn encoder outputs into what the index stores and the reranker compares.

One `Featurizer` serves both sides, so a mention and an entity are encoded the same way:
  text pair   `surface [SEP] context`  (mention: mention + sentence; entity: name + attributes)
  name view   `surface` alone (surface form carries much of the signal on the MEL benchmarks)
  image       the backbone's pooled vector and patch map, or nothing
Global vector (FAISS):  [sqrt(1-v) * pair, sqrt(v) * name, w * image_block]   (blocks L2-normalised)
Local features (OT):    pair token states and image patches, projected to a small dimension.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.runtime import EncoderRuntime

logger = logging.getLogger(__name__)

SEG_PAD, SEG_FIRST, SEG_SECOND = 0, 1, 2  # token segment codes: padding, surface/name, context/attributes


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Projections:
    """Linear maps from backbone dimensions to stored dimensions (fitted at index build)."""

    text_mean: np.ndarray  # [Dt]
    text: np.ndarray  # [Dt, d]
    image_mean: np.ndarray  # [Di]
    image_local: np.ndarray  # [Di, d]
    image_global: np.ndarray  # [Di, g]
    name_weight: float  # v: share of the name view in the text block
    image_weight: float  # w: weight of the image block

    def save(self, path: Path) -> None:
        np.savez(path, **{k: np.asarray(v) for k, v in self.__dict__.items()})

    @classmethod
    def load(cls, path: Path) -> Projections:
        with np.load(path) as z:
            raw = {k: z[k] for k in z.files}
        raw["name_weight"] = float(raw["name_weight"])
        raw["image_weight"] = float(raw["image_weight"])
        return cls(**raw)

    @property
    def global_dim(self) -> int:
        return 2 * self.text.shape[0] + self.image_global.shape[1]

    @property
    def local_dim(self) -> int:
        return self.text.shape[1]


@dataclass
class Features:
    global_: np.ndarray  # [B, D] float32
    text_local: np.ndarray  # [B, T, d] float32, L2-normalised rows (zeros on padding)
    text_seg: np.ndarray  # [B, T] uint8 segment codes
    image_local: np.ndarray  # [B, P, d] float32 (zeros when absent; the blank image's for the student)
    image_present: np.ndarray  # [B] bool
    unit_globals: np.ndarray | None = None  # student only: [B, 2, d] text and image unit globals (cross terms)


class StudentFeaturizer:
    """Features from the trained student encoders (models/student.py) for one side."""

    kind = "student"

    def __init__(self, runtime: EncoderRuntime, side: str) -> None:
        if not runtime.student_sessions:
            raise ValueError("the runtime has no student encoders (EL_ENCODER__HEADS=none?)")
        self.runtime = runtime
        self.side = side

    def __call__(self, surfaces: Sequence[str], contexts: Sequence[str], images: Sequence[Image.Image | None]) -> Features:
        f = self.runtime.encode_student(self.side, surfaces, contexts, images)  # type: ignore[arg-type]
        seg = np.where(f.first_mask, SEG_FIRST, np.where(f.text_mask, SEG_SECOND, SEG_PAD)).astype(np.uint8)
        return Features(f.global_.astype(np.float32), f.text_local.astype(np.float32), seg,
                        f.image_local.astype(np.float32), f.image_present,
                        np.stack([f.g_text, f.g_image], axis=1).astype(np.float32))


class Featurizer:
    """Zero-shot features: backbone outputs under fixed projections fitted at index build."""

    kind = "zero-shot"

    def __init__(self, runtime: EncoderRuntime, projections: Projections) -> None:
        self.runtime = runtime
        self.proj = projections

    def raw_text(self, surfaces: Sequence[str], contexts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(pair global [B,Dt], name global [B,Dt], tokens [B,T,Dt], segments [B,T]) before projection."""
        pair = self.runtime.encode_texts(surfaces, contexts)
        name = self.runtime.encode_texts(surfaces)
        seg = np.where(pair.mask, np.where(pair.type_ids == 0, SEG_FIRST, SEG_SECOND), SEG_PAD).astype(np.uint8)
        return pair.global_, name.global_, pair.tokens, seg

    def __call__(self, surfaces: Sequence[str], contexts: Sequence[str], images: Sequence[Image.Image | None]) -> Features:
        pair_g, name_g, tokens, seg = self.raw_text(surfaces, contexts)
        img = self.runtime.encode_images(images)
        return self.combine(pair_g, name_g, tokens, seg, img.global_, img.patches, img.present)

    def combine(self, pair_g: np.ndarray, name_g: np.ndarray, tokens: np.ndarray, seg: np.ndarray,
                img_g: np.ndarray, img_p: np.ndarray, present: np.ndarray) -> Features:
        p, v = self.proj, self.proj.name_weight
        img_block = l2n((img_g - p.image_mean) @ p.image_global) * present[:, None]
        global_ = np.concatenate(
            [np.sqrt(1 - v) * l2n(pair_g), np.sqrt(v) * l2n(name_g), p.image_weight * img_block], axis=1
        ).astype(np.float32)
        text_local = l2n((tokens - p.text_mean) @ p.text) * (seg > 0)[..., None]
        image_local = l2n((img_p - p.image_mean) @ p.image_local) * present[:, None, None]
        return Features(global_, text_local.astype(np.float32), seg, image_local.astype(np.float32), present)
