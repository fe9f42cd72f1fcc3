"""Build the configured index: export encoders if needed, read the KG, encode, write the folder."""

from __future__ import annotations

import logging
from pathlib import Path

from kg_index.build import build_index
from kg_index.manifest import Manifest
from kg_index.readers import read_kg
from kg_index.source import kg_source
from service.encoders import export_encoders
from service.settings import Settings

logger = logging.getLogger(__name__)


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
