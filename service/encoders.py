"""The encoders the service runs: exported to ONNX on first use (backbones + the configured student heads)."""

from __future__ import annotations

from models.export import ensure_exported
from models.runtime import EncoderRuntime
from service.settings import Settings


def export_encoders(settings: Settings) -> EncoderRuntime:
    enc = settings.encoder
    ensure_exported(enc.onnx_dir, text=enc.text_backbone, image=enc.image_backbone, clip_path=enc.clip_path,
                    max_tokens=enc.max_tokens, image_size=enc.image_size, heads=enc.student_weights(),
                    quantize=enc.int8_mentions())
    return EncoderRuntime(enc.onnx_dir, device=enc.device, threads=enc.intra_op_threads)
