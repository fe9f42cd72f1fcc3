"""Job intake: turn a submission (JSON {"items": [...]} or JSONL, one link request per line) into stored items.

Only the schema is checked here (a line that is not a link request with an id rejects the whole upload
with its line number, before anything is stored); decoding (text rules, base64 images) happens per item
in the worker, where a bad item fails alone.

The fingerprint is a SHA-256 over the items' canonical JSON, so the same items sent as JSON, as JSONL or
as a multipart file give the same fingerprint (what Idempotency-Key replays are compared against).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import ValidationError

from service.conversions import first_error
from service.errors import DuplicateItemId, InvalidInput, TooManyItems
from service.schemas import JobCreateRequest, JobItem

JSONL_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonlines", "application/jsonlines"})


@dataclass(frozen=True)
class Submission:
    items: list[tuple[str, str]]  # (item id, canonical request JSON), in input order
    fingerprint: str


class _Collector:
    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self.items: list[tuple[str, str]] = []
        self._ids: set[str] = set()
        self._hash = hashlib.sha256()

    def add(self, item: JobItem, where: str) -> None:
        if item.id in self._ids:
            raise DuplicateItemId(f"{where}: item id {item.id!r} appears more than once; ids must be unique in a job")
        if len(self.items) >= self.max_items:
            raise TooManyItems(f"a job holds at most {self.max_items} items")
        self._ids.add(item.id)
        canonical = item.model_dump_json(exclude_none=True)
        self._hash.update(canonical.encode())
        self._hash.update(b"\n")
        self.items.append((item.id, canonical))

    def finish(self) -> Submission:
        if not self.items:
            raise InvalidInput("the job has no items")
        return Submission(self.items, self._hash.hexdigest())


def parse_json(data: bytes, *, max_items: int) -> Submission:
    """A JSON body: {"items": [<link request with "id">, ...]}."""
    try:
        body = JobCreateRequest.model_validate_json(data)
    except ValidationError as exc:
        raise InvalidInput(first_error(exc)) from None
    if len(body.items) > max_items:
        raise TooManyItems(f"a job holds at most {max_items} items (got {len(body.items)})")
    out = _Collector(max_items)
    for i, item in enumerate(body.items):
        out.add(item, f"items.{i}")
    return out.finish()


def parse_jsonl(lines: Iterable[bytes], *, max_items: int) -> Submission:
    """JSONL: one link request with "id" per line; blank lines are skipped."""
    out = _Collector(max_items)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = JobItem.model_validate_json(line)
        except ValidationError as exc:
            raise InvalidInput(f"line {n}: {first_error(exc)}") from None
        out.add(item, f"line {n}")
    return out.finish()

