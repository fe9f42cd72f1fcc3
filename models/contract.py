"""The ONNX contract: file names, input/output names and dimensions shared by export and runtime.

The index manifest records `EncoderSpec.signature()`; an index built with other encoders is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

CONTRACT_VERSION = "2"

TEXT_FILE = "text_encoder.onnx"
IMAGE_FILE = "image_encoder.onnx"
SPEC_FILE = "encoder_spec.json"

# Text encoder: token ids and mask in, a pooled vector and per-token states out.
TEXT_INPUTS = ("input_ids", "attention_mask")  # int64 [B, T]
TEXT_OUTPUTS = ("text_global", "text_tokens")  # float32 [B, Dt], [B, T, Dt]
# Image encoder: pixels in [-1, 1] (or the backbone's own normalisation), a pooled vector and patches out.
IMAGE_INPUTS = ("pixels",)  # float32 [B, 3, S, S]
IMAGE_OUTPUTS = ("image_global", "image_patches")  # float32 [B, Di], [B, P, Di]
# Trained student encoders (text backbone + one OT-MEL head), one graph per side; the image backbone above
# feeds them its features (a missing image: image_present False, the head substitutes the blank image).
STUDENT_FILES = {"mention": "student_mention.onnx", "entity": "student_entity.onnx"}
STUDENT_INPUTS = ("input_ids", "attention_mask",  # int64 [B, T]
                  "text_mask", "first_mask",  # bool [B, T]: content tokens; tokens of the mention / entity name
                  "image_global", "image_patches", "image_present")  # float32 [B, Di], [B, P, Di]; bool [B]
STUDENT_OUTPUTS = ("global", "text_local", "image_local", "g_text", "g_image")
# float32 [B, 4d] retrieval vector, [B, T, d], [B, P, d] unit-norm local features, [B, d], [B, d] unit globals
# The mention encoder again for runs with no image (most requests): the first four inputs only, the blank image's
# features folded in as constants; the same outputs as the full graph fed image_present all False.
TEXT_ONLY_MENTION_FILE = "student_mention.textonly.onnx"
TEXT_ONLY_INPUTS = STUDENT_INPUTS[:4]


# On EncoderSpec.heads: the mention encoder is int8. The ".3" names the quantisation recipe: the head and the
# backbone's output projections kept in fp32 (models/export.int8_excluded_nodes). Recipe 2 (".2") quantised the
# output projections too, which cost up to 0.27 H@1 points; recipe 1 ("+int8") also had the head's image
# projections quantised. An old spec no longer matches, so ensure_exported redoes its int8 file.
INT8_SUFFIX = "+int8.3"
LEGACY_INT8_SUFFIXES = ("+int8.2", "+int8")
ENTITY_INT8_RECIPE = "+int8.2"  # the int8 entity encoder of live updates: every backbone matrix product in int8
_ANY_INT8 = re.compile(r"\+int8(\.\d+)?$")


@dataclass(frozen=True)
class EncoderSpec:
    """What an exported encoder pair is; written beside the ONNX files and into each index manifest."""

    name: str  # e.g. "minilm-l6+efficientnet-lite0"
    text_dim: int
    image_dim: int  # 0 when the image backbone is disabled
    image_patches: int
    max_tokens: int
    image_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    tokenizer: str  # file name of tokenizer.json beside the ONNX files
    weights_sha256: str  # digest of the source weights, so a retrained head changes the signature
    heads: str = ""  # "" = zero-shot features; else "student@<sha256 of the head weights>[+int8.2: int8 mention encoder]"
    heads_dim: int = 0  # d of the student's local features and unit globals
    contract_version: str = CONTRACT_VERSION

    @property
    def int8_mentions(self) -> bool:
        """The mention encoder is served in int8 (student_mention.int8.onnx); entities are always fp32."""
        return self.heads.endswith(INT8_SUFFIX)

    def signature(self) -> str:
        """What an index built with these encoders depends on. An int8 mention encoder is left out: entities are
        always encoded in fp32, so either precision reads the same index."""
        fields = asdict(self) | {"heads": _ANY_INT8.sub("", self.heads)}
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderSpec:
        raw = json.loads(text)
        raw["pixel_mean"] = tuple(raw["pixel_mean"])
        raw["pixel_std"] = tuple(raw["pixel_std"])
        return cls(**raw)
