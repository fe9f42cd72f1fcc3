"""Client side of /v1/jobs for `el link-file`: submit a JSONL file, follow progress, download the results.

The Idempotency-Key is derived from the file's SHA-256, so running the command again on the same file
(after Ctrl-C, a dropped connection, a server restart) finds the same job instead of starting another.
Transient trouble (connection errors, 429, 502-504) is retried with backoff until `give_up_after_s`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_RETRY_STATUS = frozenset({429, 502, 503, 504})


class JobClientError(RuntimeError):
    """The server refused the job or the job cannot be followed; the message is for the user."""


def file_key(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"link-file-sha256-{h.hexdigest()}"


@dataclass
class JobClient:
    base_url: str
    api_key: str | None = None
    timeout_s: float = 60.0
    give_up_after_s: float = 600.0
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        self.http = httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers,
                                 timeout=httpx.Timeout(self.timeout_s, connect=10.0))

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, *, body: Callable[[], Any] | None = None,
                 headers: dict[str, str] | None = None) -> httpx.Response:
        """One call, retried on transport errors and 429/502/503/504 (Retry-After honoured) until give_up_after_s."""
        deadline = time.monotonic() + self.give_up_after_s
        delay = 0.5
        while True:
            try:
                content = body() if body is not None else None
                try:
                    resp = self.http.request(method, url, content=content, headers=headers)
                finally:
                    if hasattr(content, "close"):
                        content.close()
                if resp.status_code not in _RETRY_STATUS:
                    return resp
                wait = _retry_after(resp, delay)
                why = f"HTTP {resp.status_code}"
            except httpx.TransportError as exc:
                wait, why = delay, f"{type(exc).__name__}"
            if time.monotonic() + wait > deadline:
                raise JobClientError(f"{method} {url}: gave up after {self.give_up_after_s:.0f} s ({why})")
            logger.info("%s %s: %s; retrying in %.1f s", method, url, why, wait)
            self.sleep(wait)
            delay = min(delay * 2, 10.0)

    def submit_file(self, path: Path, key: str) -> tuple[str, bool]:
        """Stream the file as JSONL; returns (job_id, created)."""
        size = path.stat().st_size
        headers = {"Content-Type": "application/x-ndjson", "Idempotency-Key": key, "Content-Length": str(size)}
        resp = self._request("POST", "/v1/jobs", body=lambda: path.open("rb"), headers=headers)
        if resp.status_code not in (200, 202):
            raise JobClientError(f"job refused: HTTP {resp.status_code} {_error_text(resp)}")
        return resp.json()["job_id"], resp.status_code == 202

    def status(self, job_id: str) -> dict[str, Any]:
        resp = self._request("GET", f"/v1/jobs/{job_id}")
        if resp.status_code != 200:
            raise JobClientError(f"job {job_id}: HTTP {resp.status_code} {_error_text(resp)}")
        return resp.json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """POST /v1/jobs/{id}/cancel: the worker stops at its next chunk; results so far stay readable."""
        resp = self._request("POST", f"/v1/jobs/{job_id}/cancel")
        if resp.status_code != 200:
            raise JobClientError(f"cancel job {job_id}: HTTP {resp.status_code} {_error_text(resp)}")
        return resp.json()

    def delete(self, job_id: str) -> None:
        """DELETE /v1/jobs/{id}: the job (cancelled first if it still runs), its items and results are deleted."""
        resp = self._request("DELETE", f"/v1/jobs/{job_id}")
        if resp.status_code != 204:
            raise JobClientError(f"delete job {job_id}: HTTP {resp.status_code} {_error_text(resp)}")

    def wait(self, job_id: str, *, poll_s: float = 1.0, on_progress: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
        while True:
            job = self.status(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["state"] in TERMINAL:
                return job
            self.sleep(poll_s)

    def download(self, job_id: str, out: Path) -> int:
        """Stream the results to out (written under a temporary name, then renamed); returns the line count."""
        tmp = out.with_name(out.name + ".part")
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = 0
        with self.http.stream("GET", f"/v1/jobs/{job_id}/results") as resp:
            if resp.status_code != 200:
                resp.read()
                raise JobClientError(f"results of job {job_id}: HTTP {resp.status_code} {_error_text(resp)}")
            with tmp.open("wb") as f:
                for chunk in resp.iter_bytes():
                    f.write(chunk)
                    lines += chunk.count(b"\n")
        os.replace(tmp, out)
        return lines


def _retry_after(resp: httpx.Response, default: float) -> float:
    value = resp.headers.get("retry-after", "")
    return min(float(value), 60.0) if value.isdigit() else default


def _error_text(resp: httpx.Response) -> str:
    try:
        err = resp.json()["error"]
        return f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]
