"""Encode stage: mentions -> global vectors and local features, through the ONNX runtime."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from models.features import Features, Featurizer
from service.errors import DeadlineExceeded
from service.pipeline.types import LinkQuery

logger = logging.getLogger(__name__)


def encode_queries(featurizer: Featurizer, queries: Sequence[LinkQuery], *, delay_ms: int = 0,
                   deadline: float | None = None) -> Features:
    """One batched encoder call for all queries (mention [SEP] context, mention alone, image).

    Raises `DeadlineExceeded` instead of calling the model once `deadline` (time.monotonic) has passed.
    """
    if delay_ms:  # test hook (reliability.md): make this stage slow on purpose
        time.sleep(delay_ms / 1000)
    check_deadline(deadline)
    return featurizer([q.mention for q in queries], [q.context for q in queries], [q.image for q in queries])


def check_deadline(deadline: float | None) -> None:
    """Stop between stages once the request's deadline has passed: its client has had its 504 already."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("request deadline exceeded")
