"""Export the configured backbones to ONNX (checked by onnx.checker) with dynamic batch and length.

Run once per machine, at index-build time; the runtime and the index builder both load the result.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import torch

from models import contract
from models.backbones import Backbones, load_backbones

logger = logging.getLogger(__name__)

OPSET = 17


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: tuple, outputs: tuple, axes: dict) -> None:
    import onnx

    tmp = path.with_suffix(".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow in HF code
        torch.onnx.export(
            module, args, str(tmp), input_names=list(inputs), output_names=list(outputs),
            dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)  # atomic: a half-written file never carries the final name


def export_backbones(backbones: Backbones, out_dir: Path, *, max_tokens: int, image_size: int) -> contract.EncoderSpec:
    """Write text/image ONNX files, the tokenizer and the spec into out_dir; return the spec."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = backbones.text.eval()
    ids = torch.ones(2, 12, dtype=torch.long)
    mask = torch.ones(2, 12, dtype=torch.long)
    _export(
        text, (ids, mask), out_dir / contract.TEXT_FILE, contract.TEXT_INPUTS, contract.TEXT_OUTPUTS,
        {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
         "text_global": {0: "batch"}, "text_tokens": {0: "batch", 1: "tokens"}},
    )
    shutil.copyfile(text.tokenizer_path, out_dir / "tokenizer.json")
    image = backbones.image
    if image is not None:
        pixels = torch.zeros(2, 3, image_size, image_size)
        _export(
            image.eval(), (pixels,), out_dir / contract.IMAGE_FILE, contract.IMAGE_INPUTS, contract.IMAGE_OUTPUTS,
            {"pixels": {0: "batch"}, "image_global": {0: "batch"}, "image_patches": {0: "batch"}},
        )
    spec = contract.EncoderSpec(
        name=f"{text.name}+{image.name if image else 'none'}",
        text_dim=text.dim,
        image_dim=image.dim if image else 0,
        image_patches=image.patches if image else 0,
        max_tokens=max_tokens,
        image_size=image_size,
        pixel_mean=image.mean if image else (0.0, 0.0, 0.0),
        pixel_std=image.std if image else (1.0, 1.0, 1.0),
        tokenizer="tokenizer.json",
        weights_sha256=backbones.weights_sha256,
    )
    (out_dir / contract.SPEC_FILE).write_text(spec.to_json())
    logger.info("exported encoders %s to %s (signature %s)", spec.name, out_dir, spec.signature())
    return spec


def ensure_exported(out_dir: Path, *, text: str, image: str, clip_path: Path | None, max_tokens: int,
                    image_size: int) -> contract.EncoderSpec:
    """Export unless out_dir already holds a complete export of the same configuration."""
    spec_path = out_dir / contract.SPEC_FILE
    files = [out_dir / contract.TEXT_FILE, out_dir / "tokenizer.json"] + ([out_dir / contract.IMAGE_FILE] if image != "none" else [])
    if spec_path.exists() and all(f.exists() for f in files):
        spec = contract.EncoderSpec.from_json(spec_path.read_text())
        if spec.max_tokens == max_tokens and spec.image_size == image_size and (spec.image_dim > 0) == (image != "none"):
            return spec
    logger.info("exporting encoders to ONNX in %s", out_dir)
    return export_backbones(load_backbones(text, image, clip_path), out_dir, max_tokens=max_tokens, image_size=image_size)
