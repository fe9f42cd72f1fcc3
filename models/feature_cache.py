"""Frozen backbone features, computed once through the ONNX backbones and cached on disk for training.

One folder per item set (the KB, or one benchmark split), memory-mapped when read:
  tokens.npy         [N, T, Dt] fp16   text token states of `surface [SEP] context` (T = max tokens)
  text_mask.npy      [N, T] bool       content tokens (no [CLS]/[SEP]/padding)
  first_mask.npy     [N, T] bool       content tokens of the first text (mention / entity name)
  image_rows.npy     [N] int32         row into the image arrays, -1 when the item has no image
  image_global.npy   [M, Di] fp16      pooled image features of the items that have one
  image_patches.npy  [M, P, Di] fp16   their patch features
  meta.json          ids, gold ids (mentions), backbone signature
The same runtime serves these features at inference, so the heads see exactly what they trained on.
A shallow student's mention side trains on an inner layer's token states instead (`InnerLayerText`, through
torch: the ONNX text encoder gives the last layer only); those folders carry a `-layerN` suffix.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.runtime import EncoderRuntime, TextFeatures

logger = logging.getLogger(__name__)


@dataclass
class CachedItems:
    ids: list[str]
    gold: list[str]  # answers (mention sets); empty for the KB
    tokens: np.ndarray
    text_mask: np.ndarray
    first_mask: np.ndarray
    image_rows: np.ndarray
    image_global: np.ndarray
    image_patches: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def backbone_signature(runtime: EncoderRuntime) -> str:
    """The backbones' signature, whatever heads the runtime also carries: cached features depend on it alone."""
    return replace(runtime.spec, heads="", heads_dim=0).signature()


def blank_image_features(runtime: EncoderRuntime) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's (global [Di], patches [P, Di]) for an all-zero input image (OT-MEL's missing image)."""
    spec = runtime.spec
    if runtime.image_session is None:
        return np.zeros(max(spec.image_dim, 1), np.float32), np.zeros((max(spec.image_patches, 1), max(spec.image_dim, 1)), np.float32)
    zeros = np.zeros((1, 3, spec.image_size, spec.image_size), np.float32)
    g, p = runtime.image_session.run(None, {"pixels": zeros})
    return g[0].astype(np.float32), p[0].astype(np.float32)


class InnerLayerText:
    """Token states after the first `layer` layers of the text backbone (0: the embeddings), tokenised as the
    runtime does; `encode_texts` mirrors `EncoderRuntime.encode_texts`."""

    def __init__(self, runtime: EncoderRuntime, bert: torch.nn.Module, layer: int) -> None:
        self.runtime, self.layer = runtime, layer
        self.bert = copy.deepcopy(bert).eval()
        self.bert.encoder.layer = self.bert.encoder.layer[:layer]  # the layers above are never needed

    @torch.no_grad()
    def encode_texts(self, first: Sequence[str], second: Sequence[str] | None = None) -> TextFeatures:
        ids, attn, content, type_ids = self.runtime.tokenize(first, second)
        if self.layer == 0:  # no layers left to run: a layer-less encoder returns no hidden states at all
            tokens = self.bert.embeddings(input_ids=torch.from_numpy(ids)).numpy()  # [B, T, Dt]
        else:
            out = self.bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn),
                            output_hidden_states=True)
            tokens = out.hidden_states[self.layer].numpy()  # [B, T, Dt]
        return TextFeatures(np.zeros((len(ids), tokens.shape[-1]), np.float32), tokens, content, type_ids)


def inner_backbone(runtime: EncoderRuntime) -> torch.nn.Module:
    """The torch text backbone (BERT) behind the runtime's ONNX one, for inner-layer states and tuned layers."""
    from models.backbones import MINILM_NAME, load_backbones

    if not runtime.spec.name.startswith(MINILM_NAME):
        raise ValueError(f"a shallow student mention encoder needs the MiniLM text backbone, not {runtime.spec.name}")
    return load_backbones("minilm", "none", None).text.model


def text_masks(runtime: EncoderRuntime | InnerLayerText, first: Sequence[str], second: Sequence[str],
               width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [B, width, Dt], text_mask, first_mask) for `first [SEP] second`, padded/cut to width."""
    f = runtime.encode_texts(first, second)
    b, t = f.mask.shape
    tokens = np.zeros((b, width, f.tokens.shape[-1]), np.float32)
    text_mask = np.zeros((b, width), bool)
    first_mask = np.zeros((b, width), bool)
    w = min(t, width)
    tokens[:, :w] = f.tokens[:, :w]
    text_mask[:, :w] = f.mask[:, :w]
    first_mask[:, :w] = f.mask[:, :w] & (f.type_ids[:, :w] == 0)
    return tokens, text_mask, first_mask


def build_cache(runtime: EncoderRuntime, folder: Path, ids: Sequence[str], first: Sequence[str],
                second: Sequence[str], images: Sequence[Path | None], gold: Sequence[str] = (),
                *, batch_size: int = 64, desc: str = "caching features", load_image=None,
                inner: InnerLayerText | None = None) -> CachedItems:
    """Encode every item once and write the folder (skipped when a complete one with the same ids exists).
    With `inner`, the token states are that inner layer's."""
    meta_path = folder / "meta.json"
    signature = backbone_signature(runtime) + (f"@layer{inner.layer}" if inner else "")
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("ids") == list(ids) and meta.get("signature") == signature:
            return load_cache(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, width, dt = len(ids), runtime.spec.max_tokens, runtime.spec.text_dim
    tokens = np.lib.format.open_memmap(folder / "tokens.npy", mode="w+", dtype=np.float16, shape=(n, width, dt))
    text_mask = np.zeros((n, width), bool)
    first_mask = np.zeros((n, width), bool)
    image_rows = np.full(n, -1, np.int32)
    img_g: list[np.ndarray] = []
    img_p: list[np.ndarray] = []
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch"):
        sl = slice(start, min(start + batch_size, n))
        tok, tm, fm = text_masks(inner or runtime, first[sl], second[sl], width)
        tokens[sl], text_mask[sl], first_mask[sl] = tok.astype(np.float16), tm, fm
        pics: list[Image.Image | None] = [load_image(p) if load_image and p else None for p in images[sl]]
        if any(p is not None for p in pics):
            f = runtime.encode_images(pics)
            for j in np.flatnonzero(f.present):
                image_rows[start + j] = len(img_g)
                img_g.append(f.global_[j].astype(np.float16))
                img_p.append(f.patches[j].astype(np.float16))
    tokens.flush()
    del tokens
    np.save(folder / "text_mask.npy", text_mask)
    np.save(folder / "first_mask.npy", first_mask)
    np.save(folder / "image_rows.npy", image_rows)
    di, p = max(runtime.spec.image_dim, 1), max(runtime.spec.image_patches, 1)
    np.save(folder / "image_global.npy", np.stack(img_g) if img_g else np.zeros((0, di), np.float16))
    np.save(folder / "image_patches.npy", np.stack(img_p) if img_p else np.zeros((0, p, di), np.float16))
    meta_path.write_text(json.dumps({"ids": list(ids), "gold": list(gold), "signature": signature}))
    logger.info("cached %d items (%d with images) in %s", n, len(img_g), folder)
    return load_cache(folder)


def load_cache(folder: Path) -> CachedItems:
    meta = json.loads((folder / "meta.json").read_text())
    return CachedItems(
        ids=meta["ids"], gold=meta["gold"],
        tokens=np.load(folder / "tokens.npy", mmap_mode="r"),
        text_mask=np.load(folder / "text_mask.npy"), first_mask=np.load(folder / "first_mask.npy"),
        image_rows=np.load(folder / "image_rows.npy"),
        image_global=np.load(folder / "image_global.npy"), image_patches=np.load(folder / "image_patches.npy"),
    )
