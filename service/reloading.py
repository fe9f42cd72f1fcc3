"""Swap the served index for a verified one. POST /v1/admin/reload and SIGHUP both come here.

With `el serve --workers N` the admin route reloads the worker it reaches and asks the supervisor to SIGHUP the
others (service/peers.py). The new folder is loaded and fully verified in a worker thread (checksums, dimensions, id map) while the old
index keeps serving; only then does `Linker.swap_index` replace the snapshot, so every request is answered
wholly from one index. A bad folder changes nothing and the error names the offending file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio

from kg_index.manifest import IndexIntegrityError
from service.errors import Conflict, InvalidIndex
from service.heap import freeze_loaded_heap
from service.schemas import ReloadResponse
from service.state import AppState

logger = logging.getLogger(__name__)


async def reload_index(state: AppState, folder: Path | None = None, *, everywhere: bool = False) -> ReloadResponse:
    """Verify folder (default: the configured EL_INDEX__DIR) and swap to it; one reload at a time. In a worker
    process of `el serve --workers N`, `everywhere` (the admin route) has the supervisor reload the others too, and
    only the configured folder may be loaded: each worker would otherwise serve its own."""
    linker = state.require_linker()
    configured = state.settings.index.dir
    if state.peers is not None and folder is not None and Path(folder).resolve() != Path(configured).resolve():
        raise Conflict("this server runs several worker processes (EL_WORKERS), which all serve EL_INDEX__DIR: "
                       "build the new index there (POST /v1/admin/reload without a body then loads it in each), or "
                       "set EL_INDEX__DIR to it and restart")
    if state.reloading:  # checked and set in one event-loop step: no lock needed
        raise Conflict("an index reload is already running")
    state.reloading = True
    target = folder if folder is not None else state.settings.index.dir
    previous = linker.index.version
    try:
        new = await anyio.to_thread.run_sync(linker.swap_index, target)
    except IndexIntegrityError as exc:
        state.metrics.index_reloads.labels("refused").inc()
        logger.error("index reload refused, still serving %s: %s", previous, exc)
        raise InvalidIndex(f"index refused, still serving {previous}: {exc}") from None
    except (OSError, ValueError) as exc:
        state.metrics.index_reloads.labels("refused").inc()
        logger.error("index reload from %s refused, still serving %s: %s", target, previous, type(exc).__name__)
        raise InvalidIndex(f"index refused, still serving {previous}: {target}: unreadable "
                           f"({type(exc).__name__})") from None
    finally:
        state.reloading = False
    await anyio.to_thread.run_sync(freeze_loaded_heap)  # the new index's objects, as at start-up
    state.metrics.index_reloads.labels("ok").inc()
    logger.info("index reloaded from %s: %s -> %s", target, previous, new.version)
    if everywhere and state.peers is not None:
        state.peers.ask_others_to_reload()
    return ReloadResponse(index_version=new.version, previous_version=previous, index_dir=str(target),
                          entities=len(new))
