"""The values that flow between pipeline stages (no framework types)."""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

from PIL import Image

from service.pipeline.terms import TERMS

# The pipeline's stages in the Linker's timings_ms and in /metrics' el_stage_latency_seconds{stage}. "rerank" is the
# rerank stage's total; RERANK_STAGES are its parts (their sum is about "rerank"; the rest is mixing the terms):
# reading the candidates' stored features (memory-mapped), the Sinkhorn solves, the rest of the cross terms
# (similarities, transport contexts, pooling), the string terms and the KG terms. On CUDA, torch's asynchronous
# kernels make the split approximate (the total stays exact: results are copied back before it ends).
RERANK_STAGES = ("rerank_gather", "rerank_sinkhorn", "rerank_pool", "rerank_strings", "rerank_kg")
STAGES = ("encode", "retrieve", "rerank", *RERANK_STAGES, "respond", "total")


@dataclass
class LinkQuery:
    """A decoded, validated mention: what every entry point hands the Linker."""

    mention: str
    context: str = ""
    image: Image.Image | None = None
    top_k: int = 10
    id: str | None = None
    explain: bool = False  # return the alignment pictures of the top candidates (service/pipeline/explain.py)


# One ranked entity: its final score, its retrieval score, and one field per rerank term (terms.TERMS, in that
# order; None when reranking is off), e.g. rerank_score, name_score, ..., description_overlap_score.
Candidate = make_dataclass(
    "Candidate",
    [("id", str), ("name", str), ("score", float), ("retrieval_score", float),
     *((t.field, float | None, field(default=None)) for t in TERMS)],
    namespace={"__module__": __name__},
)


@dataclass
class LinkResult:
    mention: str
    entities: list[Candidate]
    nil: bool
    index_version: str
    model_version: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    id: str | None = None
    confidence: float | None = None  # calibrated P(the top entity is right); None without entities
    explain: list | None = None  # explain.Alignment of the top candidates, when the query asked for them


@dataclass
class OTStats:
    """Solver outcome of one rerank call, for metrics."""

    problems: int
    iterations: int
    converged: int
    max_marginal_error: float
