"""The fast lane for plain JSON POST /v1/link (service/fast_lane.py) answers exactly as the route does.

Two apps over the deterministic fake backend (tests/fakes.py), one with the lane (the default) and one without
(EL_LINK_FAST_LANE=false), get the same requests: good ones, every kind of bad one, with and without an API key,
and before the model is ready. Status, headers and body must match byte for byte (an answer's measured timings
aside). What does not take the lane (a query string, multipart) is checked to go through
the route. The real server and real encoders answer through the lane in tests/service/test_api.py, which posts JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import fast_lane
from service.fast_lane import LinkFastLane, takes_lane
from tests.server_process import metric, scrape
from tests.service.test_api_fake import DOUGLAS, KEY, serve

JSON = {"content-type": "application/json"}

# (body, headers): every outcome the route has for a JSON body, good and bad.
CASES: list[tuple[bytes, dict[str, str]]] = [
    (json.dumps(DOUGLAS).encode(), JSON),
    (json.dumps({"mention": "Plato", "top_k": 2}).encode(), JSON),
    (json.dumps({"mention": "Ada Lovelace", "context": "née Byron, 1815"}).encode(), {"content-type": "application/json; charset=utf-8"}),
    (b'{"mention": "Plato"', JSON),  # invalid JSON
    (b"", JSON),  # no body
    (b"[1, 2]", JSON),  # not an object
    (json.dumps({"context": "no mention"}).encode(), JSON),  # missing field
    (json.dumps({"mention": "Plato", "colour": "red"}).encode(), JSON),  # unknown field
    (json.dumps({"mention": "Plato", "top_k": "many"}).encode(), JSON),  # wrong type
    (json.dumps({"mention": "Plato", "top_k": 100_000}).encode(), JSON),  # over the cap
    (json.dumps({"mention": "   "}).encode(), JSON),  # blank
    (json.dumps({"mention": "x" * 5000}).encode(), JSON),  # too long
    (json.dumps({"mention": "Plato", "image": "not base64!"}).encode(), JSON),  # a bad image
    (b"x" * (8 * 1024 * 1024 + 1), JSON),  # over the body cap (the middleware outside the lane)
]


def _answers(client: TestClient, cases: list[tuple[bytes, dict[str, str]]]) -> list[tuple[int, dict, bytes | dict]]:
    """(status, headers, body) per case; a 200's body parsed, without its timings (they are measured) and so
    without its content-length."""
    out: list[tuple[int, dict, bytes | dict]] = []
    for body, headers in cases:
        r = client.post("/v1/link", content=body, headers=headers)
        got: bytes | dict = r.content
        seen = {k: v for k, v in r.headers.items() if k != "date"}
        if r.status_code == 200:
            got = r.json()
            assert set(got.pop("timings_ms")) >= {"encode", "retrieve", "total"}
            seen.pop("content-length")
        out.append((r.status_code, seen, got))
    return out


@pytest.fixture
def both(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    with serve(tmp_path / "lane") as (lane, _), serve(tmp_path / "route", link_fast_lane=False) as (route, _):
        yield lane, route


def test_the_lane_answers_every_json_request_as_the_route_does(both: tuple[TestClient, TestClient]) -> None:
    lane, route = both
    got, want = _answers(lane, CASES), _answers(route, CASES)
    assert [s for s, _, _ in want] == [200, 200, 200, 422, 422, 422, 422, 422, 422, 422, 422, 422, 422, 413]
    for case, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"case {case}: {CASES[case][0][:60]!r}"


def test_the_lane_keeps_the_api_key_and_readiness_rules(tmp_path: Path) -> None:
    cases = [(json.dumps(DOUGLAS).encode(), JSON), (json.dumps(DOUGLAS).encode(), {**JSON, "x-api-key": "wrong"}),
             (json.dumps(DOUGLAS).encode(), {**JSON, "authorization": f"Bearer {KEY}"})]
    auth = {"api_keys": [KEY]}
    with serve(tmp_path / "a", auth=auth) as (lane, _), serve(tmp_path / "b", auth=auth, link_fast_lane=False) as (route, _):
        got, want = _answers(lane, cases), _answers(route, cases)
    assert [s for s, _, _ in want] == [401, 401, 200]
    assert got == want
    with serve(tmp_path / "c", fail="faiss.index") as (lane, _), \
            serve(tmp_path / "d", fail="faiss.index", link_fast_lane=False) as (route, _):
        got, want = _answers(lane, cases[:1]), _answers(route, cases[:1])
    assert want[0][0] == 503 and json.loads(want[0][2])["error"]["code"] == "not_ready"  # type: ignore[arg-type]
    assert got == want


def test_only_plain_json_link_requests_take_the_lane(both: tuple[TestClient, TestClient],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    lane, _ = both
    taken: list[bytes] = []
    real = LinkFastLane._link

    async def spy(self: LinkFastLane, body: bytes, receive):  # type: ignore[no-untyped-def]
        taken.append(body)
        return await real(self, body, receive)

    monkeypatch.setattr(LinkFastLane, "_link", spy)
    assert lane.post("/v1/link", json=DOUGLAS).status_code == 200
    assert len(taken) == 1
    r = lane.post("/v1/link?explain=true", json=DOUGLAS)  # a query string: the route (which reads it)
    assert r.status_code == 200
    assert lane.post("/v1/link", files={"mention": (None, "Douglas Adams")}).status_code == 200  # multipart: the route
    assert lane.post("/v1/link", content=b"mention=Plato", headers={"content-type": "text/plain"}).status_code == 415
    assert lane.post("/v1/link/batch", json={"items": [{"mention": "Plato"}]}).status_code == 200
    assert len(taken) == 1
    samples = scrape(lane)  # the lane's requests are counted under the route, as the router's are
    assert metric(samples, "el_requests_total", route="/v1/link", method="POST", status="200") == 3
    assert metric(samples, "el_requests_total", route="unmatched") == 0


@pytest.mark.parametrize(("scope", "lane"), [
    ({"method": "POST", "path": "/v1/link", "query_string": b"", "headers": [(b"content-type", b"application/json")]}, True),
    ({"method": "POST", "path": "/v1/link", "query_string": b"", "headers": [(b"content-type", b"Application/JSON; x=1")]}, True),
    ({"method": "POST", "path": "/v1/link", "query_string": b"explain=false", "headers": [(b"content-type", b"application/json")]}, False),
    ({"method": "POST", "path": "/v1/link", "query_string": b"", "headers": []}, False),
    ({"method": "POST", "path": "/v1/link", "query_string": b"", "root_path": "/el", "headers": [(b"content-type", b"application/json")]}, False),
    ({"method": "GET", "path": "/v1/link", "query_string": b"", "headers": [(b"content-type", b"application/json")]}, False),
    ({"method": "POST", "path": "/v1/link/batch", "query_string": b"", "headers": [(b"content-type", b"application/json")]}, False),
])
def test_which_requests_take_the_lane(scope: dict, lane: bool) -> None:
    assert takes_lane({"type": "http", **scope}) is lane
    assert fast_lane.PATH == "/v1/link"
