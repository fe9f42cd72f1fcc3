"""Encode stage: mentions -> global vectors and local features, through the ONNX runtime."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from models.features import Features, Featurizer
from service.pipeline.types import LinkQuery

logger = logging.getLogger(__name__)


def encode_queries(featurizer: Featurizer, queries: Sequence[LinkQuery], *, delay_ms: int = 0) -> Features:
    """One batched encoder call for all queries (mention [SEP] context, mention alone, image)."""
    if delay_ms:  # test hook (reliability.md): make this stage slow on purpose
        time.sleep(delay_ms / 1000)
    return featurizer([q.mention for q in queries], [q.context for q in queries], [q.image for q in queries])
