"""ONNX Runtime wrapper: the one place that runs the encoders, for the index builder and the service.

CUDA execution provider when present and allowed, CPU otherwise. Inputs are plain strings and
RGB PIL images; outputs are numpy arrays (global vectors, local features and their masks).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from models import contract

logger = logging.getLogger(__name__)

BUCKET_TOKENS = 8  # length band of one encoder run (tokens)
BUCKET_LEAST = 4  # rows below which a band joins its neighbour
IMAGE_CHUNK = 4  # images per image-encoder run (encode_images): measured in scripts/bench_image_chunk.py
_TEXT_LOCAL = contract.STUDENT_OUTPUTS.index("text_local")


@dataclass
class TextFeatures:
    global_: np.ndarray  # [B, Dt] float32, L2-normalised
    tokens: np.ndarray  # [B, T, Dt] float32
    mask: np.ndarray  # [B, T] bool: real tokens (special tokens and padding excluded)
    type_ids: np.ndarray  # [B, T] 0 for the first text of a pair, 1 for the second


@dataclass
class StudentFeatures:
    global_: np.ndarray  # [B, 4d] retrieval vector
    text_local: np.ndarray  # [B, T, d] unit rows, zeros off the content tokens
    text_mask: np.ndarray  # [B, T] bool content tokens
    first_mask: np.ndarray  # [B, T] bool tokens of the first text (mention / entity name)
    image_local: np.ndarray  # [B, P, d] (the blank image's when absent)
    g_text: np.ndarray  # [B, d]
    g_image: np.ndarray  # [B, d]
    image_present: np.ndarray  # [B] bool


@dataclass
class ImageFeatures:
    global_: np.ndarray  # [B, Di] float32 (zeros where there is no image)
    patches: np.ndarray  # [B, P, Di] float32
    present: np.ndarray  # [B] bool


def picks_cuda(device: str) -> bool:
    """Whether `device` ("auto", "cpu", "cuda") runs the encoders on ONNX Runtime's CUDA provider here."""
    return _providers(device)[0] == "CUDAExecutionProvider"


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        logger.warning("CUDA requested but onnxruntime has no CUDA provider; running on CPU")
    return ["CPUExecutionProvider"]


class EncoderRuntime:
    """Encode texts and images with the exported ONNX encoders."""

    def __init__(self, onnx_dir: Path, *, device: Literal["auto", "cpu", "cuda"] = "auto", threads: int = 0,
                 int8_entities: bool = False) -> None:
        """int8_entities: encode entities with student_entity.int8.onnx (models/export.ensure_int8_entity_encoder
        makes it); the live-update worker's option, never the index build's."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.spec = contract.EncoderSpec.from_json((onnx_dir / contract.SPEC_FILE).read_text())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        # Spinning worker threads would steal the cores the reranker (torch) and numpy need next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = _providers(device)
        self.text_session = ort.InferenceSession(str(onnx_dir / contract.TEXT_FILE), opts, providers=providers)
        self.image_session = None
        if self.spec.image_dim:
            self.image_session = ort.InferenceSession(str(onnx_dir / contract.IMAGE_FILE), opts, providers=providers)
        self.student_sessions = {}
        self.text_only_sessions = {}  # side -> the graph for runs with no image, where the export has one
        if self.spec.heads:
            for side, name in contract.STUDENT_FILES.items():
                int8 = self.spec.int8_mentions if side == "mention" else int8_entities
                suffix = ".int8.onnx" if int8 else ".onnx"
                self.student_sessions[side] = ort.InferenceSession(str((onnx_dir / name).with_suffix(suffix)), opts,
                                                                   providers=providers)
                if side == "mention" and (text_only := (onnx_dir / contract.TEXT_ONLY_MENTION_FILE).with_suffix(suffix)).exists():
                    self.text_only_sessions[side] = ort.InferenceSession(str(text_only), opts, providers=providers)
        self.providers = self.text_session.get_providers()
        self.tokenizer = Tokenizer.from_file(str(onnx_dir / self.spec.tokenizer))
        # longest_first cuts the longer text first (the context, for a short mention), and also works for a
        # single text or an over-long first text, where only_second would raise.
        self.tokenizer.enable_truncation(self.spec.max_tokens, strategy="longest_first")
        self.tokenizer.enable_padding()
        mean = np.asarray(self.spec.pixel_mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(self.spec.pixel_std, dtype=np.float32).reshape(3, 1)
        self._pixel_table = ((np.arange(256, dtype=np.float32)[None, :] / 255.0) - mean) / std  # [3, 256] float32
        self.invocations = 0  # real model calls, for tests and metrics
        logger.info("encoder runtime %s on %s (mention encoder %s)", self.spec.name, self.providers,
                    "int8" if self.spec.int8_mentions else "fp32")

    def tokenize(self, first: Sequence[str], second: Sequence[str] | None = None) -> tuple[np.ndarray, ...]:
        """Token ids, attention mask, content-token mask (no [CLS]/[SEP]/padding) and type ids."""
        if second is None:
            encs = self.tokenizer.encode_batch(list(first))
        else:
            encs = self.tokenizer.encode_batch(list(zip(first, second)))
        ids = np.asarray([e.ids for e in encs], dtype=np.int64)
        attn = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
        special = np.asarray([e.special_tokens_mask for e in encs], dtype=bool)
        type_ids = np.asarray([e.type_ids for e in encs], dtype=np.int64)
        return ids, attn, (attn.astype(bool) & ~special), type_ids

    def encode_texts(self, first: Sequence[str], second: Sequence[str] | None = None) -> TextFeatures:
        """Encode `first [SEP] second` pairs (or single texts); empty input gives empty arrays."""
        dim = self.spec.text_dim
        if not first:
            empty = np.zeros((0, 1), np.int64)
            return TextFeatures(np.zeros((0, dim), np.float32), np.zeros((0, 1, dim), np.float32), empty.astype(bool), empty)
        ids, attn, content, type_ids = self.tokenize(first, second)
        self.invocations += 1
        glob, tokens = self.text_session.run(list(contract.TEXT_OUTPUTS), {"input_ids": ids, "attention_mask": attn})
        return TextFeatures(glob.astype(np.float32), tokens.astype(np.float32), content, type_ids)

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[B, 3, S, S] float32 pixels, normalised: ((v / 255) - mean) / std per channel, read from a 256-entry
        table per channel (the same float32 operations, so the same bits) rather than computed over the whole
        batch in three float passes: about 2.5x cheaper for photos."""
        size = self.spec.image_size
        u8 = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images])
        out = np.empty((len(u8), 3, size, size), np.float32)
        for c in range(3):
            out[:, c] = self._pixel_table[c][u8[..., c]]
        return out

    def encode_images(self, images: Sequence[Image.Image | None]) -> ImageFeatures:
        """Encode images; a missing image yields zeros and present=False (OT-MEL feeds an all-zero image)."""
        n, dim, patches = len(images), self.spec.image_dim, max(self.spec.image_patches, 1)
        glob = np.zeros((n, dim), np.float32)
        local = np.zeros((n, patches, dim), np.float32)
        present = np.asarray([im is not None for im in images], dtype=bool)
        if self.image_session is None or not present.any():
            return ImageFeatures(glob, local, present & (self.image_session is not None))
        idx = np.flatnonzero(present)
        self.invocations += 1
        # A few images per run: the CNN's activations for 64 images (~100 MB) spill every cache, and a batch of 64
        # cost 2.3x more CPU per image than runs of 1-8 on this project's 2-core CPU (scripts/bench_image_chunk.py).
        for start in range(0, len(idx), IMAGE_CHUNK):
            part = idx[start : start + IMAGE_CHUNK]
            pixels = self.preprocess([images[i] for i in part])  # type: ignore[misc]
            g, p = self.image_session.run(list(contract.IMAGE_OUTPUTS), {"pixels": pixels})
            glob[part], local[part] = g, p
        return ImageFeatures(glob, local, present)

    def encode_student(self, side: Literal["mention", "entity"], first: Sequence[str], second: Sequence[str],
                       images: Sequence[Image.Image | None]) -> StudentFeatures:
        """The trained student's features for `first [SEP] second` pairs (+ optional images) of one side."""
        sess = self.student_sessions[side]
        d = self.spec.heads_dim
        patches = max(self.spec.image_patches, 1)
        if not first:
            z = np.zeros((0, 1), bool)
            return StudentFeatures(np.zeros((0, 4 * d), np.float32), np.zeros((0, 1, d), np.float32), z, z,
                                   np.zeros((0, patches, d), np.float32), np.zeros((0, d), np.float32),
                                   np.zeros((0, d), np.float32), np.zeros(0, bool))
        ids, attn, content, type_ids = self.tokenize(first, second)
        first_mask = content & (type_ids == 0)
        text_only = self.text_only_sessions.get(side)
        if text_only is not None and all(im is None for im in images):
            img = None  # no all-zero image inputs to build: the text-only graph has the blank image built in
            present = np.zeros(len(images), bool)
        else:
            img = self.encode_images(images)
            present = img.present
        self.invocations += 1
        n, width = ids.shape
        outs: list[np.ndarray] = []
        for rows in length_buckets(attn.sum(axis=1)):
            t = int(attn[rows].sum(axis=1).max())  # right padding: cut to the bucket's own longest row
            feed = {"input_ids": ids[rows, :t], "attention_mask": attn[rows, :t], "text_mask": content[rows, :t],
                    "first_mask": first_mask[rows, :t]}
            if img is None or (text_only is not None and not img.present[rows].any()):
                got = text_only.run(list(contract.STUDENT_OUTPUTS), feed)  # type: ignore[union-attr]
            else:
                feed |= {"image_global": img.global_[rows], "image_patches": img.patches[rows],
                         "image_present": img.present[rows]}
                got = sess.run(list(contract.STUDENT_OUTPUTS), feed)
            if not outs:
                outs = [np.zeros((n, *o.shape[1:]), o.dtype) for o in got]
                outs[_TEXT_LOCAL] = np.zeros((n, width, *got[_TEXT_LOCAL].shape[2:]), got[_TEXT_LOCAL].dtype)
            for i, part in enumerate(got):
                if i == _TEXT_LOCAL:
                    outs[i][rows, :t] = part  # zeros past the content tokens, as the model writes them
                else:
                    outs[i][rows] = part
        glob, text_local, image_local, g_text, g_image = outs
        return StudentFeatures(glob, text_local, content, first_mask, image_local, g_text, g_image, present)


def length_buckets(lengths: np.ndarray, *, step: int = BUCKET_TOKENS, least: int = BUCKET_LEAST) -> list[np.ndarray]:
    """Row indices grouped by token length (in `step`-token bands, shortest first), so that each encoder run pads
    to its own longest row: a transformer's cost grows with the padded width, and a batch padded to its one
    longest row spent most of its time on padding (mentions average 19 of 40 tokens, KG entities 23). Attention
    masks make the outputs of a row independent of its padding. Bands smaller than `least` rows join the next
    longer band (or the one before, at the end): every run has a fixed cost."""
    order = np.argsort(lengths, kind="stable")
    bands = (lengths[order] + step - 1) // step
    cuts = np.flatnonzero(np.diff(bands)) + 1
    groups = [g for g in np.split(order, cuts) if len(g)]
    merged: list[np.ndarray] = []
    carry = np.zeros(0, dtype=order.dtype)
    for g in groups:
        g = np.concatenate([carry, g]) if len(carry) else g
        if len(g) < least:
            carry = g
            continue
        merged.append(g)
        carry = np.zeros(0, dtype=order.dtype)
    if len(carry):
        if merged:
            merged[-1] = np.concatenate([merged[-1], carry])
        else:
            merged.append(carry)
    return merged
