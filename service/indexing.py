"""Build the configured index: export encoders if needed, read the KG, encode, write the folder.

Also the one check that an index was built from the configured KG (`check_index_source`), shared by
`el build-index --if-missing`, the service's start-up and its index reloads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kg_index.build import build_index
from kg_index.manifest import MANIFEST, IndexIntegrityError, Manifest
from kg_index.readers import read_kg
from kg_index.source import SourceCheck, check_source, kg_source
from models.export import ensure_exported
from models.runtime import EncoderRuntime
from service.settings import Settings

logger = logging.getLogger(__name__)

REBUILD_HINT = ("rebuild it (make index, or el build-index --if-missing) or set EL_INDEX__ALLOW_SOURCE_MISMATCH=true "
                "to serve it anyway")


class KGSourceMismatch(IndexIntegrityError):
    """The index was built from another KG than the configured one. The message names both."""


def export_encoders(settings: Settings) -> EncoderRuntime:
    enc = settings.encoder
    ensure_exported(enc.onnx_dir, text=enc.text_backbone, image=enc.image_backbone, clip_path=enc.clip_path,
                    max_tokens=enc.max_tokens, image_size=enc.image_size, heads=enc.student_weights(),
                    quantize=enc.quantize_int8)
    return EncoderRuntime(enc.onnx_dir, device=enc.device, threads=enc.intra_op_threads)


def build_configured_index(settings: Settings, *, out_dir: Path | None = None, progress: bool = True) -> Manifest:
    ix = settings.index
    runtime = export_encoders(settings)
    # Fingerprinted before reading: a file edited in between then differs from the record, so the next
    # check rebuilds rather than trusting a stale index.
    source = kg_source(ix.kg, settings.data_dir, ix.limit)
    entities = read_kg(ix.kg, settings.data_dir)
    if ix.limit:
        entities = entities[: ix.limit]
    return build_index(
        entities, runtime, out_dir or ix.dir, kg=ix.kg, local_dim=ix.local_dim, image_global_dim=ix.image_global_dim,
        name_weight=ix.name_view_weight, image_weight=ix.image_weight, faiss_factory=ix.faiss_factory,
        batch_size=ix.build_batch_size, progress=progress, source=source,
    )


def check_index_source(settings: Settings, manifest: Manifest) -> SourceCheck:
    """Whether the index of `manifest` was built from the configured KG, as that KG is on disk now."""
    ix = settings.index
    return check_source(manifest.source, ix.kg, settings.data_dir, ix.limit)


def require_configured_source(settings: Settings, folder: Path) -> str | None:
    """The serving policy: raise KGSourceMismatch for an index built from another KG, unless
    EL_INDEX__ALLOW_SOURCE_MISMATCH is set; then, or when the source cannot be checked, log a warning and
    return it (the service shows it in /readyz's detail for a mismatch). None when the sources match.

    An unknown source (an index built before sources were recorded, or a configured KG that cannot be read
    here) is served with a warning in the log only: the index itself is verified, and refusing every older
    index would break running deployments; `el build-index --if-missing` rebuilds such an index.
    """
    m = Manifest.read(folder)
    check = check_index_source(settings, m)
    if check.status == "match":
        return None
    where = f"{folder / MANIFEST}: index {m.version} ({m.n_entities} entities)"
    if check.status == "unknown":
        logger.warning("%s: %s", where, check.message)
        return None
    if not settings.index.allow_source_mismatch:
        raise KGSourceMismatch(f"{where} was {check.message}; {REBUILD_HINT}")
    warning = f"serving index {m.version} ({m.n_entities} entities) {check.message} (EL_INDEX__ALLOW_SOURCE_MISMATCH)"
    logger.warning("%s was %s; serving it anyway because EL_INDEX__ALLOW_SOURCE_MISMATCH is set", where, check.message)
    return warning
