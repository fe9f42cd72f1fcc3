"""/metrics lists every pipeline stage, the rerank stage's parts included, before any batch has run, and
observes each stage of a batch's timings."""

from __future__ import annotations

from service.metrics import Metrics
from service.pipeline.types import RERANK_STAGES, STAGES, OTStats


def _count(text: str, stage: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(f'el_stage_latency_seconds_count{{stage="{stage}"}}'))
    return float(line.rsplit(" ", 1)[1])


def test_every_stage_is_listed_from_the_start_and_observed() -> None:
    assert set(RERANK_STAGES) < set(STAGES) and "rerank" in STAGES
    m = Metrics()
    text = m.render().decode()
    assert all(_count(text, s) == 0.0 for s in STAGES)
    m.observe_batch({s: 1.5 for s in STAGES}, [OTStats(4, 9, 4, 1e-5)])
    text = m.render().decode()
    assert all(_count(text, s) == 1.0 for s in STAGES)
