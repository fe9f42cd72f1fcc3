"""Async batch jobs: POST /v1/jobs, GET /v1/jobs, GET /v1/jobs/{id}, GET /v1/jobs/{id}/results,
POST /v1/jobs/{id}/cancel (stop it, keep what it produced) and DELETE /v1/jobs/{id} (cancel, then delete the
job with its items and results).

A job is persisted before the 202. Results stream as JSONL in input order, one line per input id, once
the job is finished (succeeded, failed or cancelled); before that the results route answers 409
job_not_finished with Retry-After (no partial streams: a client never has to merge two downloads).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.errors import InvalidInput, JobExpired, JobNotFinished, JobNotFound, NotReady, UnsupportedMediaType
from service.jobs.intake import JSONL_TYPES, Submission, parse_json, parse_jsonl
from service.jobs.manager import JobManager
from service.jobs.store import JobRecord, JobStore
from service.schemas import ErrorResponse, JobAccepted, JobCreateRequest, JobList, JobProgress, JobStatus, inline_schema
from service.state import AppState

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["jobs"])

_SPOOL_MEMORY_BYTES = 8 * 1024 * 1024  # larger uploads spill to a temporary file
_STREAM_BATCH_LINES = 500  # result lines per chunk sent (one thread hop per chunk, not per line)
_NOT_RUN = {
    "cancelled": ("cancelled", "the job was cancelled before this item ran"),
    "failed": ("job_failed", "the job failed before this item ran"),
}
_ERRORS = {code: {"model": ErrorResponse} for code in (404, 409, 410, 413, 415, 422, 429, 503)}
_JSONL_SCHEMA = {"type": "string", "description": "One link request with an \"id\" per line."}


def _manager(request: Request) -> JobManager:
    state: AppState = request.app.state.el
    if state.jobs is None:
        raise NotReady("jobs are not enabled on this server")
    return state.jobs


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_status(job: JobRecord) -> JobStatus:
    return JobStatus(job_id=job.id, state=job.state, progress=JobProgress(done=job.done, total=job.total, failed=job.failed),
                     attempts=job.attempts, created_at=_iso(job.created_at) or "", started_at=_iso(job.started_at),
                     finished_at=_iso(job.finished_at), expires_at=_iso(job.expires_at), error=job.error)


async def _live_job(store: JobStore, job_id: str) -> JobRecord:
    """The job, or 404 (unknown or already swept) / 410 (past its expiry, not yet swept)."""
    job = await run_in_threadpool(store.get, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    if store.is_expired(job):
        raise JobExpired(f"job {job_id} and its results expired at {_iso(job.expires_at)}")
    return job


async def _read_submission(request: Request, jm: JobManager) -> Submission:
    """Parse off the event loop: a big upload must not stall /v1/link traffic."""
    max_items = jm.cfg.max_items
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        data = await request.body()
        return await run_in_threadpool(parse_json, data, max_items=max_items)
    if ctype in JSONL_TYPES:
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY_BYTES) as spool:
            async for chunk in request.stream():
                spool.write(chunk)
            spool.seek(0)
            return await run_in_threadpool(parse_jsonl, spool, max_items=max_items)
    if ctype == "multipart/form-data":
        # The body cap (EL_JOBS__MAX_BODY_BYTES) bounds the file part; it is spooled to disk, not held in memory.
        form = await request.form(max_files=1, max_fields=4, max_part_size=1024 * 1024)
        try:
            if unknown := sorted(set(form.keys()) - {"file"}):  # as documented: one part, named file
                raise InvalidInput(f"{unknown[0]}: unknown form field; send one file part named file")
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise InvalidInput("multipart upload needs a file part holding JSONL (e.g. -F file=@items.jsonl)")
            file.file.seek(0)
            return await run_in_threadpool(parse_jsonl, file.file, max_items=max_items)
        finally:
            await form.close()
    raise UnsupportedMediaType("send application/json {\"items\": [...]}, application/x-ndjson (JSONL) "
                               "or multipart/form-data with a JSONL file part")


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobAccepted,
    responses={200: {"model": JobAccepted, "description": "Idempotent replay: the job already made with this key"},
               **_ERRORS},
    summary="Submit a batch linking job (JSON items, JSONL, or a multipart JSONL file)",
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(JobCreateRequest)},
        "application/x-ndjson": {"schema": _JSONL_SCHEMA},
        "application/jsonl": {"schema": _JSONL_SCHEMA},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
    }}},
)
async def create_job(
    request: Request,
    response: Response,
    idempotency_key: str | None = Header(None, min_length=1, max_length=256,
                                         description="Same key + same items: the same job; different items: 409."),
) -> JobAccepted:
    jm = _manager(request)
    store = jm.store
    sub = await _read_submission(request, jm)
    job, created = await run_in_threadpool(
        store.create_job, sub.items, fingerprint=sub.fingerprint, idempotency_key=idempotency_key,
        max_queued=jm.cfg.max_queued, retry_after_s=jm.cfg.retry_after_s, chunk_size=jm.cfg.chunk_size)
    if created:
        jm.notify()
        logger.info("job %s queued: %d items", job.id, job.total)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobAccepted(job_id=job.id, state=job.state)


@router.get("/jobs", response_model=JobList, responses=_ERRORS, summary="Recent jobs, newest first")
async def list_jobs(
    request: Request,
    limit: int = Query(20, ge=1, le=1000),
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = Query(None),
) -> JobList:
    store = _manager(request).store
    jobs = await run_in_threadpool(store.recent, limit, state)
    return JobList(jobs=[job_status(j) for j in jobs if not store.is_expired(j)])


@router.get("/jobs/{job_id}", response_model=JobStatus, responses=_ERRORS, summary="State and progress of a job")
async def get_job(job_id: str, request: Request) -> JobStatus:
    return job_status(await _live_job(_manager(request).store, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobStatus, responses=_ERRORS,
             summary="Cancel a job (no-op once finished); compute stops at the next chunk, results so far stay readable")
async def cancel_job(job_id: str, request: Request) -> JobStatus:
    store = _manager(request).store
    await _live_job(store, job_id)
    job = await run_in_threadpool(store.cancel, job_id)
    if job is None:  # swept in between
        raise JobNotFound(f"no job {job_id!r}")
    return job_status(job)


@router.delete("/jobs/{job_id}", status_code=204, response_class=Response,
               responses={204: {"description": "Deleted: the job, its items and its results are gone (then 404)"},
                          **_ERRORS},
               summary="Delete a job and its results; a queued or running job is cancelled first")
async def delete_job(job_id: str, request: Request) -> Response:
    # An expired job not yet swept is deleted too (its 410 only says the results are gone).
    if not await run_in_threadpool(_manager(request).store.delete, job_id):
        raise JobNotFound(f"no job {job_id!r}")
    return Response(status_code=204)


@router.get(
    "/jobs/{job_id}/results",
    responses={200: {"content": {"application/x-ndjson": {}},
                     "description": "One line per input item, in input order: {\"id\", \"result\"} or {\"id\", \"error\"}"},
               **_ERRORS},
    summary="Results of a finished job as JSONL",
)
async def job_results(job_id: str, request: Request) -> StreamingResponse:
    store = _manager(request).store
    job = await _live_job(store, job_id)
    if not job.finished:
        raise JobNotFinished(f"job {job_id} is {job.state} ({job.done}/{job.total} done); results come once it finishes",
                             headers={"Retry-After": "2"})
    headers = {"X-Job-State": job.state, "X-Job-Items": str(job.total)}
    return StreamingResponse(_result_lines(store, job), media_type="application/x-ndjson", headers=headers)


def _result_lines(store: JobStore, job: JobRecord) -> Iterator[bytes]:
    """Stored JSON is spliced in as is (no re-parse); items that never ran get the job's reason as their error."""
    not_run = _NOT_RUN.get(job.state, ("not_run", "this item did not run"))
    missing = json.dumps({"code": not_run[0], "message": not_run[1]})
    lines: list[str] = []
    for _, item_id, result, error in store.iter_outcomes(job.id):
        key = json.dumps(item_id)
        if result is not None:
            lines.append(f'{{"id": {key}, "result": {result}}}\n')
        else:
            lines.append(f'{{"id": {key}, "error": {error if error is not None else missing}}}\n')
        if len(lines) >= _STREAM_BATCH_LINES:
            yield "".join(lines).encode()
            lines = []
    if lines:
        yield "".join(lines).encode()
