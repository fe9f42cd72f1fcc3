"""Job intake: JSON and JSONL parse to the same items and fingerprint; bad input names its line."""

from __future__ import annotations

import json

import pytest

from service.errors import DuplicateItemId, InvalidInput, TooManyItems
from service.jobs.intake import parse_json, parse_jsonl

ITEMS = [{"id": "a", "mention": "Douglas Adams", "top_k": 3}, {"id": "b", "mention": "Berlin", "context": None}]


def jsonl(items: list[dict]) -> list[bytes]:
    return [json.dumps(i).encode() + b"\n" for i in items]


def test_json_and_jsonl_give_the_same_items_and_fingerprint() -> None:
    a = parse_json(json.dumps({"items": ITEMS}).encode(), max_items=10)
    b = parse_jsonl([b"\n", *jsonl(ITEMS), b"  \n"], max_items=10)
    assert a == b
    assert [i for i, _ in a.items] == ["a", "b"]
    assert json.loads(a.items[1][1]) == {"id": "b", "mention": "Berlin"}
    other = parse_jsonl(jsonl([ITEMS[1], ITEMS[0]]), max_items=10)
    assert other.fingerprint != a.fingerprint  # order is part of the job


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(DuplicateItemId, match="line 2") as exc:
        parse_jsonl(jsonl([ITEMS[0], ITEMS[0]]), max_items=10)
    assert exc.value.status == 422 and exc.value.code == "duplicate_item_id"


@pytest.mark.parametrize("line", [b"{not json}\n", b'{"mention": "no id"}\n', b'{"id": "x", "mention": "m", "nope": 1}\n'])
def test_a_line_that_is_not_a_link_request_names_its_line(line: bytes) -> None:
    with pytest.raises(InvalidInput, match="^line 2: "):
        parse_jsonl([*jsonl(ITEMS[:1]), line], max_items=10)


def test_item_cap_and_empty_jobs() -> None:
    with pytest.raises(TooManyItems):
        parse_jsonl(jsonl(ITEMS), max_items=1)
    with pytest.raises(TooManyItems):
        parse_json(json.dumps({"items": ITEMS}).encode(), max_items=1)
    with pytest.raises(InvalidInput, match="no items"):
        parse_jsonl([b"\n"], max_items=10)
    with pytest.raises(InvalidInput):
        parse_json(b'{"items": []}', max_items=10)
