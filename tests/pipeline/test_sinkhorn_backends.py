"""The compiled Sinkhorn (models/sinkhorn_numba.py) with the real parts: real encoders, a real index of about 400
entities, text mentions and mentions with a real photo (KG photos of indexed entities: the visual unit's problems
are then solved, not remembered); the served links are those of torch's solver."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models import sinkhorn_numba
from service.pipeline.types import LinkQuery

pytestmark = [pytest.mark.slow, pytest.mark.onnx,
              pytest.mark.skipif(not sinkhorn_numba.AVAILABLE, reason="numba is not installed")]


@pytest.fixture(scope="module")
def photo_queries(linker) -> list[LinkQuery]:
    from kg_index.readers import read_mel_kb

    index = linker.index
    by_id = {e.id: e for e in read_mel_kb(linker.settings.data_dir) if e.image is not None}
    rows = [int(r) for r in np.flatnonzero(index.image_rows >= 0) if index.entities[r].id in by_id][:4]
    assert len(rows) == 4
    return [LinkQuery(index.entities[r].name, f"A photo of {index.entities[r].name}.",
                      Image.open(by_id[index.entities[r].id].image).convert("RGB"), top_k=10) for r in rows]


@pytest.mark.parametrize("batch", [1, 20])
def test_served_links_are_the_same_with_either_backend(linker, test_mentions, photo_queries, batch: int) -> None:
    queries = [LinkQuery(m.mention, m.context, top_k=10) for m in test_mentions[:40]] + photo_queries
    runs = {}
    for backend in ("torch", "numba"):
        other = linker.with_weights(sinkhorn_backend=backend)
        runs[backend] = [r for i in range(0, len(queries), batch)
                         for r in other.link_batch(queries[i : i + batch]).results]
    for t, n in zip(runs["torch"], runs["numba"]):
        assert [e.id for e in n.entities] == [e.id for e in t.entities]
        np.testing.assert_allclose([e.rerank_score for e in n.entities], [e.rerank_score for e in t.entities],
                                   atol=1e-6)
        np.testing.assert_allclose([e.score for e in n.entities], [e.score for e in t.entities], atol=1e-6)
        assert n.nil == t.nil
