"""The one typed settings class. Built once at start-up and passed down; never read at import.

Environment variables use the prefix `EL_` and `__` for nested groups, e.g. `EL_RERANK__EPS=0.05`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class EncoderSettings(BaseModel):
    """Which backbones encode text and images, and where their ONNX exports live."""

    text_backbone: Literal["minilm", "clip"] = Field("minilm", description="Text encoder: embedded all-MiniLM-L6-v2, or a local CLIP.")
    image_backbone: Literal["efficientnet-lite0", "clip", "none"] = Field(
        "efficientnet-lite0", description="Image encoder: embedded EfficientNet-Lite0, a local CLIP, or none.")
    clip_path: Path | None = Field(None, description="Local Hugging Face CLIP checkpoint (for the 'clip' backbones).")
    onnx_dir: Path = Field(Path("artifacts/onnx"), description="Where the ONNX exports live (written on first use).")
    max_tokens: int = Field(40, ge=8, le=512, description="Token budget per text, as in OT-MEL.")
    image_size: int = Field(224, ge=32, le=1024, description="Square input size of the image encoder.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="ONNX Runtime device: CUDA provider when present.")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads; 0 lets it choose.")
    heads: Literal["student", "none"] = Field(
        "student", description="'student': the trained OT-MEL student heads (exported with the backbone); "
                               "'none': zero-shot backbone features.")
    heads_path: Path | None = Field(None, description="Student weights (.pt + .json); None uses the shipped "
                                                      "models/weights/student.pt.")
    quantize_int8: bool | Literal["auto"] = Field(
        False, description="Serve the int8 student mention encoder when it passes the accuracy gate (true; 'auto': "
        "on the CPU provider only): 1.08-1.20x the batched mentions/s, served H@1 and MRR within 0.05 points of "
        "fp32, but a mention's answer can move with its batch neighbours (see README); false: fp32.")

    def int8_mentions(self) -> bool:
        """Whether to serve the int8 mention encoder: `quantize_int8`, where 'auto' means on the CPU provider."""
        if self.quantize_int8 != "auto":
            return bool(self.quantize_int8)
        from models.runtime import picks_cuda

        return not picks_cuda(self.device)

    def student_weights(self) -> Path | None:
        if self.heads == "none":
            return None
        from models.checkpoint import STUDENT_WEIGHTS

        return self.heads_path or STUDENT_WEIGHTS


class IndexSettings(BaseModel):
    """What the index is built from and how."""

    dir: Path = Field(Path("artifacts/index/default"), description="Index folder to serve (and to build into).")
    kg: str = Field("mel", description="'mel' (union of the MEL KBs under data_dir) or a path to a JSONL KG.")
    faiss_factory: str | None = Field(None, description="FAISS factory string; None picks by size.")
    local_dim: int = Field(96, ge=8, le=1024, description="Projected dimension of stored local features.")
    image_global_dim: int = Field(128, ge=8, le=1280, description="Dimension of the image block of the global vector.")
    image_weight: float = Field(0.5, ge=0.0, description="Weight of the image block in the global vector.")
    name_view_weight: float = Field(0.5, ge=0.0, le=1.0, description="Share of the name-only view in the text block.")
    build_batch_size: int = Field(64, ge=1, le=4096, description="Entities encoded per batch during a build.")
    limit: int | None = Field(None, ge=1, description="Build from the first N entities only (tests, demos).")
    bf16_shortlist: Literal["auto", "on", "off"] = Field(
        "auto", description="Exact search of Flat indexes (batches of 6 or more): score every entity with a bf16 "
                            "copy of the vectors, rescore the best in fp32 (still exact: a rounding bound sends "
                            "any doubtful query back to fp32). 'auto': where the CPU has native bf16 dot products "
                            "(AVX512_BF16, AMX) and, for an index of 8,192 entities or more, only for the batch "
                            "sizes at which it measured faster than the fp32 GEMM when the index loaded (about a "
                            "second, once per process; kg_index/exact.py SearchPlan); 'on' anywhere; 'off' never "
                            "(saves the copy: half the vectors' memory).")
    int8_shortlist: Literal["auto", "on", "off"] = Field(
        "auto", description="Exact search of Flat indexes: score every entity with an int8 copy of the vectors "
                            "(FBGEMM, a quarter of the fp32 bytes), rescore the best in fp32 (still exact: a bound "
                            "on the int8 rounding sends any doubtful query back to fp32). 'auto': for the batch sizes "
                            "at which it measured fastest when the index loaded (with the bf16 shortlist's "
                            "measurement; small batches, one query alone), where FBGEMM's int8 products do not "
                            "saturate on the CPU (VNNI); 'on' for every batch; 'off' never (saves the copy: a "
                            "quarter of the vectors' memory).")
    allow_source_mismatch: bool = Field(
        False, description="Serve an index built from another KG than the configured one (EL_INDEX__KG, "
                           "EL_DATA_DIR, EL_INDEX__LIMIT), with a warning in the log and in /readyz's detail, "
                           "instead of refusing it; `el build-index --if-missing` then keeps it too.")


class RerankSettings(BaseModel):
    """Optimal-transport reranking of the retrieved candidates."""

    enabled: bool = Field(True, description="Rerank retrieved candidates with OT (off: retrieval order).")
    candidates: int = Field(32, ge=1, le=512, description="How many retrieved candidates are reranked.")
    eps: float = Field(0.05, gt=0.0, le=10.0, description="Entropic regulariser of Sinkhorn (log domain: stable down to 0.005; the kernel domain needs eps >= cost span / 50, i.e. 0.04 for 1 - cosine).")
    max_iter: int = Field(50, ge=1, le=10_000, description="Sinkhorn iteration cap.")
    tol: float = Field(1e-4, gt=0.0, description="Marginal error at which Sinkhorn stops.")
    sinkhorn_domain: Literal["auto", "log", "kernel"] = Field(
        "auto", description="Sinkhorn's arithmetic: 'kernel' (scalings and batched matrix products, several times "
                            "faster), 'log' (logsumexp, stable at any eps), or 'auto': per problem, the kernel domain "
                            "where fp32 holds it (cost span / eps <= 50), else the log domain. Same plans either way.")
    sinkhorn_backend: Literal["auto", "torch", "numba"] = Field(
        "auto", description="Who runs the 'auto' domain's kernel iterations on the CPU: 'numba' (compiled, problem by "
                            "problem: about 5x less time per lone mention's solve), 'torch' (batched tensor "
                            "operations), or 'auto': numba where it is installed. GPU solves always run in torch.")
    retrieval_weight: float = Field(1.0, description="Weight of the retrieval score in the final score.")
    ot_weight: float = Field(1.0, description="Weight of the OT (cross-term) score in the final score; 1.0 with retrieval 1.0 is OT-MEL's overall score.")
    name_weight: float = Field(0.049, description="Weight of the surface-form similarity (mention vs name) in the final score.")
    context_name_weight: float = Field(0.058, description="Weight of the name-in-context score (the candidate's name spelled out in mention + sentence).")
    name_tokens_weight: float = Field(0.028, description="Weight of the name-tokens term (1 when every mention token is a token of the candidate's name).")
    before_birth_weight: float = Field(-0.064, description="Weight (a penalty: negative) of the before-birth term (1 when the sentence's years all end before the candidate's birth).")
    after_death_weight: float = Field(-0.041, description="Weight (a penalty: negative) of the after-death term (1 when the sentence's years all start after the year following the candidate's death).")
    description_overlap_weight: float = Field(0.037, description="Weight of the description-overlap term (IDF mass of the sentence's words in the candidate's description).")
    skip_margin: float | None = Field(
        None, description="Adaptive rerank: skip the OT solve for a mention whose score without OT (retrieval + the "
        "name and KG terms) puts its top candidate more than this ahead of the second (its OT term is then 0); "
        "None always solves. `el fit-skip-margin` fits it on the dev splits (README: What OT adds).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Sinkhorn device: CUDA when torch sees a GPU.")
    torch_threads: int = Field(1, ge=0, description="torch threads on CPU (Sinkhorn, pooling, exact retrieval of Flat indexes); 0 leaves torch's default. 1: with about one request in flight per core, more threads fight each other and ONNX Runtime for cores.")


class CalibrationSettings(BaseModel):
    """The calibrated `confidence` and the NIL rule (README: Confidence and NIL)."""

    path: Path | None = Field(None, description="Fitted calibration JSON (`el fit-calibration --out`); None uses the "
                                                "shipped models/weights/calibration.json.")
    nil_rule: Literal["calibrated", "score_threshold"] = Field(
        "calibrated", description="'calibrated': nil when the calibrated probability that the mention's entity is "
        "in the KG is below the fitted threshold; 'score_threshold' (deprecated): nil when the top score is below "
        "EL_NIL_THRESHOLD (the rule before calibration; setting EL_NIL_THRESHOLD alone selects it).")
    nil_min_answerable: float | None = Field(
        None, ge=0.0, le=1.0, description="Override of the fitted threshold on P(answerable) (higher: more nil).")
    mention_prior: bool = Field(
        True, description="Let the NIL rule read the mention prior shipped beside the calibration (what the "
        "benchmarks' training mentions say a name usually means); it applies only to a KG that holds at least half "
        "of the entities those names usually mean. False: never.")


class LimitSettings(BaseModel):
    """Input caps; anything beyond them is a 4xx."""

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Request body cap (413), enforced while reading.")
    max_text_chars: int = Field(2000, ge=1, description="Cap on mention and context length (422 text_too_long).")
    max_batch_items: int = Field(32, ge=1, description="Items per /v1/link/batch call (422 too_many_items).")
    max_top_k: int = Field(100, ge=1, description="Largest top_k a request may ask for.")
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Image byte cap, checked before base64 decoding (413).")
    max_image_pixels: int = Field(40_000_000, ge=1024, description="Declared width x height cap, checked before decoding (413).")
    image_formats: list[Literal["JPEG", "PNG", "WEBP"]] = Field(
        ["JPEG", "PNG", "WEBP"], min_length=1, description="Allowed image formats (others: 415).")


class AdmissionSettings(BaseModel):
    """In-flight and queue caps and deadlines."""

    max_in_flight: int = Field(
        64, ge=1, description="Requests admitted at once: queued in the micro-batcher or running. It counts requests, "
                              "not batches; the CPU-bound cap is EL_BATCHING__MAX_CONCURRENT (batches running at "
                              "once), and the default admits that many full batches (2 x 32).")
    max_queue: int = Field(64, ge=0, description="Requests waiting for a slot; beyond it 429 + Retry-After.")
    request_timeout_s: float = Field(30.0, gt=0.0, description="Per-request deadline (queue + pipeline); then 504.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds on 429/503.")


class BatchingSettings(BaseModel):
    """Dynamic micro-batching: concurrent /v1/link, /v1/link/batch and job items share `Linker.link_batch` calls."""

    enabled: bool = Field(True, description="Coalesce concurrent requests into one link_batch call (off: each request "
                                            "runs alone; job items are still batched).")
    max_batch: int = Field(32, ge=1, le=1024, description="Most mentions in one interactive batch (a /v1/link/batch "
                                                          "request larger than this runs alone).")
    max_wait_ms: float = Field(2.0, ge=0.0, le=1000.0, description="Longest a batch waits for company before it "
                                                                    "runs; never past a queued request's deadline.")
    wait_when_idle: bool = Field(False, description="Wait max_wait_ms for company even when no batch is running "
                                                     "(off: a request that finds the pipeline idle starts at once; "
                                                     "requests arriving meanwhile form the next batch).")
    max_concurrent: int = Field(2, ge=1, description="Batches running at once (about one per core): the cap on "
                                                     "CPU work, interactive and job batches together.")
    split_min: int = Field(16, ge=0, description="A link_batch call of at least this many mentions that finds no "
                                                "other running in this process is linked as two halves at once, "
                                                "one per core (service/pipeline/halves.py; same answers; 1.16-1.24x "
                                                "the mentions/s of one caller's batches of 64 here, about 1.1x over "
                                                "HTTP at concurrency 8-32); a smaller one alone may scan the index in "
                                                "two halves at once for one or two queries, where the index's search "
                                                "plan measured that faster. 0: neither.")
    job_max_batch: int = Field(8, ge=1, le=4096, description="Most job items in one batch while interactive work is "
                                                             "about (small, so a request never shares the CPU long with "
                                                             "a job batch).")
    job_idle_batch: int = Field(64, ge=1, le=4096, description="Most job items in one batch once no interactive "
                                                               "request was queued or running for 5 x "
                                                               "job_max_yield_ms: a job alone runs at the batched speed "
                                                               "(a request arriving meanwhile takes another slot, or "
                                                               "waits for this batch when max_concurrent is 1).")
    job_max_yield_ms: float = Field(200.0, ge=0.0, description="While interactive requests are queued, running or "
                                                               "ran this recently, a job batch starts no sooner than "
                                                               "this long after the job's previous batch ended.")


class JobSettings(BaseModel):
    """Durable async batch jobs (/v1/jobs): store, worker, caps and expiry."""

    dir: Path = Field(Path("artifacts/jobs"), description="Folder of the job store (SQLite file jobs.sqlite3).")
    database_url: str | None = Field(
        None, description="Job store to share between processes and machines: `postgresql://user@host:port/db` "
                          "(the `scale` extra) or `sqlite:///path`; unset: the SQLite file in EL_JOBS__DIR.")
    run_worker: bool = Field(True, description="Run a job worker inside the API process; false when `el worker` "
                                               "processes (or Ray actors) on a shared store do the work.")
    chunk_size: int = Field(64, ge=1, le=4096, description="Items linked per worker batch; one commit per chunk.")
    max_attempts: int = Field(3, ge=1, description="Runs of one chunk (crashes, lost leases) before its job is marked failed.")
    lease_s: float = Field(30.0, gt=0.0, description="Worker lease on a chunk; renewed every lease_s/3.")
    result_ttl_s: float = Field(7 * 24 * 3600.0, gt=0.0, description="Finished jobs and results are kept this long (then 410/404).")
    sweep_interval_s: float = Field(300.0, gt=0.0, description="How often expired jobs are deleted.")
    poll_interval_s: float = Field(1.0, gt=0.0, description="Idle worker's wait between looks at the queue.")
    max_queued: int = Field(100, ge=1, description="Queued jobs; beyond it POST /v1/jobs answers 429 + Retry-After.")
    max_items: int = Field(1_000_000, ge=1, description="Items per job (422 too_many_items).")
    max_body_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="Body cap for POST /v1/jobs (413).")
    retry_after_s: int = Field(30, ge=1, description="Retry-After seconds when the job queue is full.")
    synchronous: Literal["NORMAL", "FULL"] = Field(
        "FULL", description="SQLite synchronous mode (WAL): FULL makes an accepted job survive power loss.")


class RaySettings(BaseModel):
    """Scale-out on Ray (the `scale` extra): `el serve --ray` replicas and `el worker --ray` job workers."""

    address: str | None = Field(None, description="Ray cluster to join (e.g. `10.0.0.5:6379` or `auto`); unset: start "
                                                   "a local Ray head in the process.")
    replicas: int = Field(2, ge=1, description="Serve replicas of the API (each loads encoders and index).")
    replica_cpus: float = Field(1.0, gt=0.0, description="CPUs Ray reserves per replica; ONNX Runtime and torch get "
                                                         "that many threads (Ray's OMP_NUM_THREADS is ignored by ORT).")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests Serve lets into one replica at once (Ray's "
                                                             "default of 5 would cap micro-batches at 5).")
    worker_cpus: float = Field(1.0, gt=0.0, description="CPUs Ray reserves per job worker actor.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs a local Ray head offers (unset: all of the machine's).")
    shared_index: bool = Field(False, description="Replicas and job worker actors follow the index folder's change log, "
                                                  "so entity changes go through any replica and reach every one: only "
                                                  "where every node sees the one folder (one host, or a shared file "
                                                  "system with working file locks). Off: replicas answer entity "
                                                  "changes with 409 updates_disabled.")


class AuthSettings(BaseModel):
    """Optional API keys. None by default; once any key is configured every /v1/* route needs one."""

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys, comma-separated or a JSON list; send one as `Authorization: Bearer <key>` "
                    "or `X-API-Key: <key>` (401 unauthorized otherwise). Never logged.")
    api_keys_file: Path | None = Field(
        None, description="File with one API key per line (blank lines and # comments ignored), added to api_keys.")
    protect_metrics: bool = Field(False, description="Require a key for /metrics too (when keys are configured).")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [k.strip() for k in text.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _read_file(self) -> AuthSettings:
        # Read once at start-up so a missing or empty key file fails loudly instead of leaving the API open.
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"EL_AUTH__API_KEYS_FILE {self.api_keys_file}: unreadable ({exc.strerror})") from None
            keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not keys:
                raise ValueError(f"EL_AUTH__API_KEYS_FILE {self.api_keys_file}: holds no key")
            known = {k.get_secret_value() for k in self.api_keys}
            self.api_keys = self.api_keys + [SecretStr(k) for k in dict.fromkeys(keys) if k not in known]
        if any(not k.get_secret_value() for k in self.api_keys):
            raise ValueError("EL_AUTH__API_KEYS: empty key")
        return self


class CorsSettings(BaseModel):
    """Cross-origin browser access: off unless origins are listed."""

    allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (e.g. https://app.example.org), comma-separated "
                    "or a JSON list; empty turns CORS off.")

    @field_validator("allow_origins", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [o.strip() for o in text.split(",") if o.strip()]
        return value

    @field_validator("allow_origins")
    @classmethod
    def _check(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"CORS origin {origin!r} must look like https://host[:port] (no path) or be '*'")
        return origins


class ShutdownSettings(BaseModel):
    """SIGTERM: readiness turns 503 first, in-flight requests finish, the process exits within grace_s."""

    grace_s: float = Field(30.0, gt=0.0, description="SIGTERM: the process exits within this many seconds "
                                                      "(drain delay + in-flight requests + clean-up).")
    drain_delay_s: float = Field(2.0, ge=0.0, description="SIGTERM: /readyz answers 503 for this long before the "
                                                           "server stops accepting connections.")

    @model_validator(mode="after")
    def _check(self) -> ShutdownSettings:
        if self.drain_delay_s >= self.grace_s:
            raise ValueError("EL_SHUTDOWN__DRAIN_DELAY_S must be below EL_SHUTDOWN__GRACE_S")
        return self


class UpdateSettings(BaseModel):
    """Live entity changes (PUT/DELETE /v1/entities, POST /v1/entities:batch): a change log in the index folder."""

    enabled: bool = Field(True, description="Accept entity changes while serving (the change log lives in the index "
                                            "folder, which must then be writable); false answers 409.")
    max_batch_items: int = Field(1000, ge=1, description="Changes per POST /v1/entities:batch (422 too_many_items).")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Body cap for POST /v1/entities:batch (413).")
    max_description_chars: int = Field(10_000, ge=1, description="Cap on an entity's description (422 text_too_long).")
    encode_batch: int = Field(64, ge=1, le=1024, description="Most entities per update encoder call. The encoder "
                                                             "runs rows in length bands, so larger calls pad less "
                                                             "(text-only KG entities, one thread: 7.1 ms each at 8, "
                                                             "5.1 at 32, 4.5 at 64); a call starts early, from 8, "
                                                             "when the next item is still being decoded.")
    encoder_threads: int = Field(1, ge=0, description="ONNX Runtime threads of the update worker's own encoder "
                                                      "sessions (same model files as the served ones): 1 leaves the "
                                                      "other cores to /v1/link; 0 shares the serving sessions.")
    int8_encoder: bool = Field(False, description="Encode changed entities with an int8 entity encoder (the head in "
                                                  "fp32; made from the fp32 one on first use, behind an accuracy "
                                                  "gate): about 2x cheaper, and a changed entity's vectors differ a "
                                                  "little from what the fp32 index build gives it (see README).")
    nice: int = Field(10, ge=0, le=19, description="How much lower the update threads' CPU priority is than the "
                                                  "server's (Linux nice value), so that /v1/link gets the cores "
                                                  "first under contention; 0: the same.")
    max_pending: int = Field(4096, ge=1, description="Entity changes waiting for the update worker; beyond it 429.")
    decode_process: bool = Field(True, description="Parse and decode POST /v1/entities:batch bodies of a megabyte or "
                                                   "more (photos: JSON, base64, images) in a child process, so their "
                                                   "GIL-heavy work never stalls /v1/link; false (and smaller "
                                                   "bodies): in the update threads.")
    compact_after: int = Field(20_000, ge=0, description="Fold the change log into a fresh index folder in the "
                                                         "background once it holds this many changes (0: only on "
                                                         "request, el compact-index).")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EL_", env_nested_delimiter="__", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to serve on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to serve on.")
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto", description="Server processes on the one port (service/prefork.py). auto: one per usable CPU (its "
                            "affinity and cgroup quota), at most 4 and at most one per 2 GiB of available memory, 1 "
                            "when the encoders run on CUDA: in one process the interpreter lock holds a server to "
                            "about 1.7 cores, and 2 processes on 2 cores answer about 1.2x the requests/s at "
                            "concurrency 32; each holds its own encoders and index (memory: 1.7 GB for one process, "
                            "2.9 GB for two, with the 41k index). Entity changes work through any of them (one shared change log); /metrics "
                            "labels each series by worker (README: Worker processes).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    data_dir: Path = Field(Path("data/mel"), description="Folder of the MEL benchmark release files.")
    features_dir: Path = Field(Path("artifacts/features"), description="Cache of frozen backbone features "
                                                                       "(training, teacher evaluation).")
    top_k: int = Field(10, ge=1, description="Entities returned when a request names no top_k.")
    nil_threshold: float = Field(0.0, description="Deprecated (EL_CALIBRATION__NIL_RULE=score_threshold): top score "
                                                  "below this marks the mention NIL; set alone, it selects that rule.")
    link_fast_lane: bool = Field(True, description="Answer POST /v1/link with a JSON body and no query string "
                                                   "without the framework's routing layers (service/fast_lane.py: the "
                                                   "same checks, answers and errors; about 6 % more requests/s at "
                                                   "concurrency 32 here); false: every request takes the route.")
    stage_delay_ms: int = Field(0, ge=0, description="Test hook: sleep this long in the encode stage.")

    encoder: EncoderSettings = EncoderSettings()
    index: IndexSettings = IndexSettings()
    rerank: RerankSettings = RerankSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    limits: LimitSettings = LimitSettings()
    admission: AdmissionSettings = AdmissionSettings()
    batching: BatchingSettings = BatchingSettings()
    auth: AuthSettings = AuthSettings()
    cors: CorsSettings = CorsSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    jobs: JobSettings = JobSettings()
    ray: RaySettings = RaySettings()
    updates: UpdateSettings = UpdateSettings()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        enc = self.encoder
        if "clip" in (enc.text_backbone, enc.image_backbone) and enc.clip_path is None:
            raise ValueError("EL_ENCODER__CLIP_PATH must name a local CLIP checkpoint for the 'clip' backbones")
        if self.top_k > self.limits.max_top_k:
            raise ValueError("EL_TOP_K exceeds EL_LIMITS__MAX_TOP_K")
        if "nil_threshold" in self.model_fields_set and "nil_rule" not in self.calibration.model_fields_set:
            # the setting of the rule before calibration keeps working (the Linker logs that it is deprecated)
            self.calibration.nil_rule = "score_threshold"
        return self
