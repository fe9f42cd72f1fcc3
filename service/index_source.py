"""The one check that an index was built from the configured KG (`check_index_source`), shared by
`el build-index --if-missing`, the service's start-up and its index reloads (online code: the Linker uses it)."""

from __future__ import annotations

import logging
from pathlib import Path

from kg_index.manifest import MANIFEST, IndexIntegrityError, Manifest
from kg_index.source import SourceCheck, check_source
from service.settings import Settings

logger = logging.getLogger(__name__)

REBUILD_HINT = ("rebuild it (make index, or el build-index --if-missing) or set EL_INDEX__ALLOW_SOURCE_MISMATCH=true "
                "to serve it anyway")


class KGSourceMismatch(IndexIntegrityError):
    """The index was built from another KG than the configured one. The message names both."""


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
