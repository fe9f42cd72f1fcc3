"""The values that flow between pipeline stages (no framework types)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class LinkQuery:
    """A decoded, validated mention: what every entry point hands the Linker."""

    mention: str
    context: str = ""
    image: Image.Image | None = None
    top_k: int = 10
    id: str | None = None


@dataclass
class Candidate:
    id: str
    name: str
    score: float
    retrieval_score: float
    rerank_score: float | None = None  # OT score; None when reranking is off
    name_score: float | None = None  # surface form vs the candidate's name
    context_name_score: float | None = None  # the candidate's name spelled out in the mention and sentence
    name_tokens_score: float | None = None  # KG-consistency terms (service.pipeline.kg_terms)
    before_birth_score: float | None = None
    after_death_score: float | None = None
    description_overlap_score: float | None = None


@dataclass
class LinkResult:
    mention: str
    entities: list[Candidate]
    nil: bool
    index_version: str
    model_version: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    id: str | None = None


@dataclass
class OTStats:
    """Solver outcome of one rerank call, for metrics."""

    problems: int
    iterations: int
    converged: int
    max_marginal_error: float
