"""Joining a Ray cluster (EL_RAY__ADDRESS) or starting a local head, and the settings a Ray process receives."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from service.settings import Settings

logger = logging.getLogger(__name__)


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SystemExit("Ray is not installed: pip install -e '.[scale]' (the `scale` extra)") from None
    return ray


def connect(settings: Settings) -> Any:
    """ray.init on EL_RAY__ADDRESS, or a local head (EL_RAY__NUM_CPUS CPUs) when unset. Returns the ray module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    cfg = settings.ray
    if cfg.address:
        ray.init(address=cfg.address, logging_level=logging.WARNING)
        logger.info("joined the Ray cluster at %s", cfg.address)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        logger.info("started a local Ray head (%s CPUs)", cfg.num_cpus or os.cpu_count())
    return ray


def _absolute(model: BaseModel) -> dict[str, Any]:
    """Relative paths resolved against this process's folder: Ray processes start in other folders."""
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = value.resolve()
        elif isinstance(value, BaseModel) and (sub := _absolute(value)):
            update[name] = value.model_copy(update=sub)
    return update


def portable(settings: Settings) -> Settings:
    """The settings to ship to replicas and actors: every path absolute (on a multi-node cluster the index and
    encoders must sit at that same path on every node: a shared file system or a copy)."""
    return settings.model_copy(update=_absolute(settings))


def pinned_threads(settings: Settings, cpus: float) -> Settings:
    """ONNX Runtime and torch threads set to the CPUs Ray gave this process (ORT ignores OMP_NUM_THREADS)."""
    n = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(n)
    return settings.model_copy(update={
        "encoder": settings.encoder.model_copy(update={"intra_op_threads": n}),
        "rerank": settings.rerank.model_copy(update={"torch_threads": n}),
    })
