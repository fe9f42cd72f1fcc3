"""Request and response schemas, named by role."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from service.pipeline.terms import TERMS


class LinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mention: str = Field(..., description="The surface form to link.", examples=["Douglas Adams"])
    context: str | None = Field(None, description="The sentence around the mention.",
                                examples=["Douglas Adams wrote The Hitchhiker's Guide to the Galaxy."])
    image: str | None = Field(None, description="Base64 image (JPEG, PNG or WebP), optionally a data: URL.")
    top_k: int | None = Field(None, ge=1, description="How many entities to return (capped by the server).")


class BatchItem(LinkRequest):
    id: str | None = Field(None, max_length=256, description="Caller's id, echoed in the result.")


class BatchLinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[BatchItem] = Field(..., min_length=1)


# One ranked entity: id, name, final score, retrieval score, then one field per rerank term
# (service/pipeline/terms.py: TERMS, in that order; null when reranking is off).
EntityScore = create_model(
    "EntityScore",
    __module__=__name__,
    id=(str, ...),
    name=(str, ...),
    score=(float, ...),
    retrieval_score=(float, ...),
    **{t.field: (float | None, Field(None, description=t.doc)) for t in TERMS},  # type: ignore[call-overload]
)


class LinkResponse(BaseModel):
    mention: str
    entities: list[EntityScore]
    confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="Calibrated probability that the top entity is the right one (fitted on the "
        "benchmarks' dev splits, models/weights/calibration.json); null when there are no entities.")
    nil: bool = Field(..., description="True when the mention's entity is probably not in the KG: the calibrated "
                      "probability that it is (answerable) is below the fitted threshold (EL_CALIBRATION__NIL_RULE), "
                      "or there are no entities.")
    index_version: str
    model_version: str
    timings_ms: dict[str, float]


class BatchResult(LinkResponse):
    id: str | None = None


class TextAlignment(BaseModel):
    mention_tokens: list[str] = Field(..., description="Content tokens of `mention [SEP] sentence`, as the "
                                      "tokenizer's wordpieces (a piece continuing a word starts with ##).")
    mention_first: int = Field(..., description="How many of mention_tokens are the mention's (the rest: the sentence).")
    entity_tokens: list[str] = Field(..., description="The entity's tokens the plan covers: `name [SEP] description` "
                                     "(zero-shot indexes: the name).")
    entity_first: int = Field(..., description="How many of entity_tokens are the name's.")
    plan: list[list[float]] = Field(..., description="Transport plan [mention token][entity token]: each row sums to "
                                    "1/len(mention_tokens), each column to 1/len(entity_tokens) (up to EL_RERANK__TOL).")


class ImageAlignment(BaseModel):
    grid: list[int] = Field(..., description="[rows, cols] of the image patch grid (7x7); patches are row-major.")
    plan: list[list[float]] = Field(..., description="Transport plan [mention patch][entity patch], uniform marginals.")
    entity_has_image: bool = Field(..., description="False: the entity side is the blank image's patches.")


class CandidateAlignment(BaseModel):
    id: str
    name: str
    rerank_score: float | None = Field(None, description="The candidate's OT term (null when its solve was skipped).")
    scorer: Literal["student", "zero-shot"] = Field(..., description="student: rerank_score = (text_term + "
                                                    "visual_term) / 6 (OT-MEL's g2l terms, from the plans normalised "
                                                    "per row and per column); zero-shot: each term is the transport-"
                                                    "weighted cosine, rerank_score the text term or the mean of both.")
    text_term: float | None = None
    visual_term: float | None = None
    text: TextAlignment | None = None
    image: ImageAlignment | None = Field(None, description="Only when the mention has an image.")


class ExplainedLinkResponse(LinkResponse):
    explain: list[CandidateAlignment] | None = Field(
        None, description="Only with explain=true (absent otherwise): the transport plans the reranker scored the "
                          "top 3 entities with (words against words, patches against patches).")


class BatchLinkResponse(BaseModel):
    results: list[BatchResult]
    index_version: str
    model_version: str
    timings_ms: dict[str, float]


class EntityResponse(BaseModel):
    id: str
    name: str
    description: str
    has_image: bool


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str
    index_version: str | None = None
    model_version: str | None = None
    detail: str | None = None


class JobItem(LinkRequest):
    """One line of a job: a /v1/link request with the caller's id (unique within the job)."""

    id: str = Field(..., min_length=1, max_length=256, description="Caller's id, echoed in the result line.")


class JobCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[JobItem] = Field(..., min_length=1)


class JobAccepted(BaseModel):
    job_id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobProgress(BaseModel):
    done: int = Field(..., description="Items with an outcome (result or error).")
    total: int
    failed: int = Field(..., description="Items whose outcome is an error (counted in done too).")


class JobStatus(BaseModel):
    job_id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: JobProgress
    attempts: int = Field(..., description="Times a worker started the job (a clean hand-back at shutdown is refunded).")
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    expires_at: str | None = Field(None, description="When the job and its results are deleted (set once finished).")
    error: str | None = None


class JobList(BaseModel):
    jobs: list[JobStatus]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index_dir: str | None = Field(None, min_length=1, max_length=4096, pattern=r"^[^\x00]+$",
                                  description="Index folder on the server; default: the configured EL_INDEX__DIR.")


class ReloadResponse(BaseModel):
    index_version: str
    previous_version: str
    index_dir: str
    entities: int


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its local `$defs` inlined, for `openapi_extra` request bodies
    (a `#/$defs/...` reference does not resolve inside the OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: object) -> object:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)  # type: ignore[return-value]


# ------------------------------------------------------------------ live entity changes (PUT/DELETE /v1/entities)

# Entity ids: 1-256 characters, none of them whitespace, a slash or a control character (checked on PUT/DELETE and
# stated in the OpenAPI document; ECMA-262 and Python read the class alike).
_ID_CLASS = "/\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff"
ENTITY_ID_PATTERN = f"^[^{_ID_CLASS}]{{1,256}}$"

class EntityRequest(BaseModel):
    """The JSONL KG fields of one entity (README: Build an index over your own KG); the image as base64."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="The entity's name.", examples=["Douglas Adams"])
    description: str | None = Field(None, description="Attribute text (as in the KG's JSONL).",
                                    examples=["Sex: male. Birth: 1952, Cambridge. Occupation: writer."])
    image: str | None = Field(None, description="Base64 image (JPEG, PNG or WebP), optionally a data: URL; the "
                                                "image rules of /v1/link apply.")
    start_year: int | None = Field(None, ge=-10_000, le=10_000, description="Birth or founding year.")
    end_year: int | None = Field(None, ge=-10_000, le=10_000, description="Death or dissolution year.")

    @field_validator("start_year", "end_year", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        """A JSON integer (1395 or 1395.0, as JSON Schema counts them), never true/false."""
        if isinstance(value, bool):
            raise ValueError("a year must be an integer")  # noqa: TRY004 (pydantic turns ValueError into a 422)
        return value


class EntityBatchPut(EntityRequest):
    """One change of a batch: create or replace the entity `id`."""

    id: str = Field(..., pattern=ENTITY_ID_PATTERN, description="The entity id.")
    op: Literal["put"] = Field("put", description="put (the default): create or replace.")


class EntityBatchDelete(BaseModel):
    """One change of a batch: remove the entity `id`."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., pattern=ENTITY_ID_PATTERN, description="The entity id.")
    op: Literal["delete"] = Field(..., description="delete: remove it.")


EntityBatchItem = EntityBatchPut | EntityBatchDelete


class EntityChangeResponse(BaseModel):
    id: str
    op: Literal["put", "delete"]
    index_version: str = Field(..., description="The index version that includes the change (and serves from now on).")
    entities: int = Field(..., description="Entities served by that version.")


class EntityBatchResult(BaseModel):
    id: str
    op: Literal["put", "delete"]


class EntityBatchResponse(BaseModel):
    applied: int
    index_version: str = Field(..., description="The index version that includes every change of the batch.")
    entities: int
    results: list[EntityBatchResult]


class CompactResponse(BaseModel):
    state: Literal["started", "done"]
    index_version: str = Field(..., description="done: the compacted version now served; started: the version "
                                                "being compacted.")
    changes: int = Field(..., description="Changes in the log when it started.")
