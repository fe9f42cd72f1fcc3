"""The HTTP API in-process over the deterministic fake backend (tests/fakes.py): error shapes, limits, auth,
admission and the job lifecycle, in seconds and without the real encoders or the benchmark data.

The app is the real one (`create_app`: middleware, exception handlers, admission, job store and worker); only
the Linker is a fake. What needs real encoders (answers, scores, images moving a ranking, real uvicorn) stays in
tests/service/test_api.py and tests/jobs (marked slow).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from PIL import Image

from service import conversions
from service.app import create_app
from service.pipeline.decode import DECODE_COUNTS, DecodeCounts
from service.routes import link as link_routes
from service.settings import Settings
from tests.fakes import FAKE_KG, FakeLinker, fake_vector
from tests.server_process import metric, scrape

JSON = {"content-type": "application/json"}
MAX_TEXT = 2000  # LimitSettings defaults
MAX_TOP_K = 100
MAX_BATCH = 32
DOUGLAS = {"mention": "Douglas Adams", "context": "Douglas Adams wrote The Hitchhiker's Guide to the Galaxy."}
KEY = "k-fake-5c0ffee1"


# ------------------------------------------------------------------------------------------------ harness


@contextmanager
def serve(tmp_path: Path, *, gate: threading.Event | None = None, fail: str | None = None,
          **groups: object) -> Iterator[tuple[TestClient, FakeLinker | None]]:
    """The real app over a FakeLinker (lifespan included), ready; `groups` replace settings groups by dict."""
    jobs = {"dir": tmp_path / "jobs", "poll_interval_s": 0.05, **groups.pop("jobs", {})}  # type: ignore[dict-item]
    settings = Settings(jobs=jobs, **groups)
    factory = FakeLinker.factory(gate=gate)

    def broken(_: Settings) -> FakeLinker:  # what a missing index file does to the real factory
        raise FileNotFoundError(f"/srv/secret/index/{fail}")

    with TestClient(create_app(settings, linker_factory=factory if fail is None else broken)) as client:
        want = 503 if fail is not None else 200
        eventually(lambda: client.get("/readyz").status_code == want and
                   (fail is None or client.get("/readyz").json()["status"] == "failed"), "the app to load")
        try:
            yield client, (factory.made[-1] if fail is None else None)  # type: ignore[attr-defined]
        finally:
            if gate is not None:
                gate.set()  # let held work finish before shutdown


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[TestClient, FakeLinker]]:
    with serve(tmp_path) as out:
        yield out  # type: ignore[misc]


@pytest.fixture
def client(app: tuple[TestClient, FakeLinker]) -> TestClient:
    return app[0]


def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll until `condition` holds; the timeout only catches a hang."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.01)


def assert_error(r: Response, status: int, code: str, message: str | None = None) -> str:
    """The exact error shape; returns the message (checked exactly when given)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    msg = body["error"]["message"]
    assert isinstance(msg, str) and msg, body
    if message is not None:
        assert msg == message, body
    return msg


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpeg(size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="GIF")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ the fake itself


def test_fake_vectors_are_deterministic_unit_vectors() -> None:
    a, b = fake_vector("Douglas Adams"), fake_vector("douglas adams")
    assert a.shape == (64,) and abs(float(a @ a) - 1.0) < 1e-5
    assert (a == b).all()  # case-folded: the same name
    assert abs(float(a @ fake_vector("Plato"))) < 0.9
    assert not (fake_vector("Douglas Adams", b"img") == a).all()


# --------------------------------------------------------------------------------------- health, docs, shape


def test_health_readiness_and_versions(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "index_version": None, "model_version": None,
                                             "detail": None}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "index_version": "fake-index@1", "model_version": "fake-encoder@0",
                        "detail": None}


def test_the_loaded_heap_is_frozen_out_of_the_cyclic_collector(tmp_path: Path) -> None:
    """Full collections must not walk the loaded model and KG (they stalled probes for 60-280 ms under load)."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    with serve(tmp_path) as (client, _):
        assert client.get("/readyz").status_code == 200
        assert gc.get_freeze_count() > 0
    gc.unfreeze()


def test_openapi_lists_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/link", "/v1/link/batch", "/v1/entities/{entity_id}", "/v1/jobs", "/v1/jobs/{job_id}"} <= set(paths)
    link_body = paths["/v1/link"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(link_body)
    assert link_body["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nope"), 404, "not_found")
    assert_error(client.get("/v1/link"), 405, "method_not_allowed")


def test_link_answer_shape_top_k_and_normalised_text(client: TestClient) -> None:
    r = client.post("/v1/link", json={"mention": "  Douglas \t Adams\n", "top_k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"mention", "entities", "confidence", "nil", "index_version", "model_version", "timings_ms"}
    assert body["mention"] == "Douglas Adams"
    assert (body["index_version"], body["model_version"]) == ("fake-index@1", "fake-encoder@0")
    ents = body["entities"]
    assert len(ents) == 5 and ents[0]["id"] == "Q42" and ents[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [e["score"] for e in ents] == sorted((e["score"] for e in ents), reverse=True)
    assert len(client.post("/v1/link", json={"mention": "Plato"}).json()["entities"]) == 10  # default top_k


def test_image_by_base64_data_url_and_multipart_agree(client: TestClient) -> None:
    img = jpeg()
    answers = [client.post("/v1/link", json={**DOUGLAS, "image": b64(img)}),
               client.post("/v1/link", json={**DOUGLAS, "image": "data:image/jpeg;base64," + b64(img)}),
               client.post("/v1/link", data=DOUGLAS, files={"image": ("a.jpg", img, "image/jpeg")})]
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    ranked = [[(e["id"], e["score"]) for e in r.json()["entities"]] for r in answers]
    assert ranked[0] == ranked[1] == ranked[2]
    text_only = client.post("/v1/link", json=DOUGLAS).json()["entities"]
    assert ranked[0] != [(e["id"], e["score"]) for e in text_only]  # the decoded image reached the fake encoder


def test_batch_in_input_order_with_ids(client: TestClient) -> None:
    names = [e.name for e in FAKE_KG[:6]]
    items = [{"id": f"m{i}", "mention": n, "top_k": 2} for i, n in enumerate(reversed(names))]
    items.append({"mention": "Plato", "top_k": 1})  # no id: echoed as null
    r = client.post("/v1/link/batch", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "index_version", "model_version", "timings_ms"}
    assert [res["id"] for res in body["results"]] == [it.get("id") for it in items]
    assert [res["entities"][0]["name"] for res in body["results"]] == [*reversed(names), "Plato"]


def test_entities(client: TestClient) -> None:
    r = client.get("/v1/entities/Q42")
    assert r.status_code == 200
    assert r.json() == {"id": "Q42", "name": "Douglas Adams", "description": FAKE_KG[0].description, "has_image": True}
    assert_error(client.get("/v1/entities/Q0nope"), 404, "entity_not_found",
                 "no entity with id 'Q0nope' in index fake-index@1")


# ------------------------------------------------------------------------------------------------ bad input
# Moved here from tests/service/test_api.py: pure request-shape cases, the real encoders add nothing to them.

BAD_JSON = [
    # (request body, status, code, exact message or prefix ending with "*")
    ({"mention": ""}, 422, "invalid_input", "mention must not be empty"),
    ({"mention": " \t\n  "}, 422, "invalid_input", "mention must not be empty"),
    ({"mention": "a\x00b"}, 422, "invalid_input", "mention contains a control character (U+0000) at position 1"),
    ({"mention": "a\x1b[31mb"}, 422, "invalid_input", "mention contains a control character (U+001B) at position 1"),
    ({"mention": "a\x85b"}, 422, "invalid_input", "mention contains a control character (U+0085) at position 1"),
    ({"mention": "ok", "context": "bad\x07"}, 422, "invalid_input",
     "context contains a control character (U+0007) at position 3"),
    ({"mention": "x" * (MAX_TEXT + 1)}, 422, "text_too_long", "mention is longer than 2000 characters (2001)"),
    ({"mention": "ok", "context": "y" * (MAX_TEXT + 1)}, 422, "text_too_long",
     "context is longer than 2000 characters (2001)"),
    ({"mention": "x" * (4 * MAX_TEXT + 1)}, 422, "text_too_long", "mention is longer than 2000 characters"),
    ({"mention": "ok", "top_k": 0}, 422, "invalid_input", "top_k:*"),
    ({"mention": "ok", "top_k": -3}, 422, "invalid_input", "top_k:*"),
    ({"mention": "ok", "top_k": MAX_TOP_K + 1}, 422, "invalid_input", "top_k must be at most 100"),
    ({"mention": "ok", "top_k": 10**30}, 422, "invalid_input", "top_k*"),
    ({"mention": "ok", "top_k": 1.5}, 422, "invalid_input", "top_k:*"),
    ({"mention": "ok", "top_k": "abc"}, 422, "invalid_input", "top_k:*"),
    ({"mention": "ok", "unknown": 1}, 422, "invalid_input", "unknown: Extra inputs are not permitted"),
    ({"context": "no mention"}, 422, "invalid_input", "mention: Field required"),
    ({"mention": None}, 422, "invalid_input", "mention:*"),
    ({"mention": 123}, 422, "invalid_input", "mention:*"),
    ({"mention": ["a"]}, 422, "invalid_input", "mention:*"),
    ([], 422, "invalid_input", "body:*"),
    ("just a string", 422, "invalid_input", "body:*"),
    ({"mention": "ok", "image": "!!!!"}, 422, "invalid_image", "image is not valid base64"),
    ({"mention": "ok", "image": "abc"}, 422, "invalid_image", "image is not valid base64 (length is not a multiple of 4)"),
    ({"mention": "ok", "image": ""}, 200, None, None),  # empty means no image
    ({"mention": "ok", "image": "data:text/html;base64,AAAA"}, 422, "invalid_image", "image data URL*"),
    ({"mention": "ok", "image": 5}, 422, "invalid_input", "image:*"),
]


@pytest.mark.parametrize(("body", "status", "code", "message"), BAD_JSON, ids=[f"json{i}" for i in range(len(BAD_JSON))])
def test_bad_json_input(client: TestClient, body: object, status: int, code: str | None, message: str | None) -> None:
    r = client.post("/v1/link", json=body)
    if code is None:
        assert r.status_code == status, r.text
        return
    if message.endswith("*"):
        msg = assert_error(r, status, code)
        assert msg.startswith(message[:-1]), msg
    else:
        assert_error(r, status, code, message)


BAD_RAW = [
    # (raw body, content type, status, code)
    (b'{"mention": ', "application/json", 422, "invalid_input"),
    (b"", "application/json", 422, "invalid_input"),
    (b"\xff\xfe\x00", "application/json", 422, "invalid_input"),
    (b'{"mention": "ok", "top_k": NaN}', "application/json", 422, "invalid_input"),
    (b'{"mention": "ok", "top_k": Infinity}', "application/json", 422, "invalid_input"),
    (b'{"mention": "\\ud800"}', "application/json", 422, "invalid_input"),
    (b'{"mention": "ok"}', "text/plain", 415, "unsupported_media_type"),
    (b'{"mention": "ok"}', None, 415, "unsupported_media_type"),
    (b"mention=ok", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b'{"mention": "ok"}', "application/xml", 415, "unsupported_media_type"),
]


@pytest.mark.parametrize(("body", "ctype", "status", "code"), BAD_RAW, ids=[f"raw{i}" for i in range(len(BAD_RAW))])
def test_bad_raw_input(client: TestClient, body: bytes, ctype: str | None, status: int, code: str) -> None:
    headers = {"content-type": ctype} if ctype else {}
    msg = assert_error(client.post("/v1/link", content=body, headers=headers), status, code)
    if status == 415:
        assert msg == "send application/json or multipart/form-data"


@pytest.mark.parametrize(("body", "status", "code", "prefix"), [
    ({"items": []}, 422, "invalid_input", "items:"),
    ({}, 422, "invalid_input", "items:"),
    ({"items": [{"mention": "ok"}, {"mention": " "}]}, 422, "invalid_input", "mention must not be empty"),
    ({"items": [{"mention": "a\x00"}]}, 422, "invalid_input", "mention contains a control character (U+0000)"),
    ({"items": [{"mention": "x" * (MAX_TEXT + 1)}]}, 422, "text_too_long", "mention is longer than 2000"),
    ({"items": [{"mention": "ok", "top_k": MAX_TOP_K + 1}]}, 422, "invalid_input", "top_k must be at most 100"),
    ({"items": [{"mention": "ok", "id": "x" * 257}]}, 422, "invalid_input", "items.0.id:"),
    ({"items": [{"mention": "ok"}], "extra": 1}, 422, "invalid_input", "extra:"),
    ({"items": [{"mention": "ok", "image": "!!!!"}]}, 422, "invalid_image", "image is not valid base64"),
    ({"items": [{"mention": "ok"}] * (MAX_BATCH + 1)}, 422, "too_many_items",
     f"at most {MAX_BATCH} items per batch (got {MAX_BATCH + 1})"),
])
def test_batch_bad_input(client: TestClient, body: dict, status: int, code: str, prefix: str) -> None:
    msg = assert_error(client.post("/v1/link/batch", json=body), status, code)
    assert msg.startswith(prefix), msg


def test_batch_malformed_json_and_wrong_content_type(client: TestClient) -> None:
    assert_error(client.post("/v1/link/batch", content=b'{"items": [', headers=JSON), 422, "invalid_input")
    r = client.post("/v1/link/batch", content=b'{"items": [{"mention": "x"}]}', headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")


def test_image_errors_by_base64_and_multipart(client: TestClient) -> None:
    gif = gif_bytes()
    for r in (client.post("/v1/link", json={"mention": "ok", "image": b64(gif)}),
              client.post("/v1/link", data={"mention": "ok"}, files={"image": ("a.gif", gif, "image/gif")})):
        assert assert_error(r, 415, "unsupported_image_format").startswith("image format GIF is not supported")
    big = b"\xff\xd8\xff" + b"\x00" * (4 * 1024 * 1024)
    assert_error(client.post("/v1/link", json={"mention": "ok", "image": b64(big)}), 413, "image_too_large")
    r = client.post("/v1/link", data={"mention": "ok"}, files={"image": ("big.jpg", big, "image/jpeg")})
    assert_error(r, 413, "image_too_large", f"image exceeds {4 * 1024 * 1024} bytes")
    r = client.post("/v1/link", data={"context": "no mention"}, files={"image": ("a.gif", b"x", "image/gif")})
    assert_error(r, 422, "invalid_input", "mention: Field required")


def test_png_bomb_header_refused_without_decoding_or_a_model_call(client: TestClient) -> None:
    header = png_header(50_000, 50_000)
    for send in (lambda: client.post("/v1/link", json={"mention": "ok", "image": b64(header)}),
                 lambda: client.post("/v1/link", data={"mention": "ok"}, files={"image": ("b.png", header, "image/png")})):
        before = scrape(client)
        r = send()
        after = scrape(client)
        assert assert_error(r, 413, "image_too_large").startswith("image is 50000x50000 = 2500000000 pixels")
        for work in ("el_image_decodes_total", "el_image_pixels_decoded_total", "el_model_invocations_total"):
            assert metric(after, work) == metric(before, work), work


def test_no_5xx_for_any_bad_input(client: TestClient) -> None:
    """Every bad body of this module's tables, on a server with room: a 4xx with the error shape, never a 5xx."""
    for body, status, _, _ in BAD_JSON:
        assert client.post("/v1/link", json=body).status_code == status
    for body, ctype, status, _ in BAD_RAW:
        assert client.post("/v1/link", content=body, headers={"content-type": ctype} if ctype else {}).status_code \
            == status
    fives = {lab: v for (n, lab), v in scrape(client).items()
             if n == "el_requests_total" and dict(lab)["status"].startswith("5")}
    assert fives == {}


# ---------------------------------------------------------------------------- decode under admission (item 1)


def test_decoding_runs_in_a_worker_thread_not_on_the_event_loop(app: tuple[TestClient, FakeLinker],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    client, fake = app
    seen: list[tuple[str, bool]] = []
    real_to_query = conversions.to_query

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((threading.get_ident(), on_loop))
        return real_to_query(*args, **kwargs)

    monkeypatch.setattr(conversions, "to_query", spy)  # /v1/link/batch (through to_queries)
    monkeypatch.setattr(link_routes, "to_query", spy)  # /v1/link
    assert client.post("/v1/link", json={**DOUGLAS, "image": b64(jpeg())}).status_code == 200
    assert client.post("/v1/link/batch", json={"items": [{"mention": "Plato"}, {"mention": "Plato"}]}).status_code == 200
    assert len(seen) == 3
    assert all(not on_loop for _, on_loop in seen), seen
    assert seen[0][0] == fake.threads[0]  # decoded in the worker thread that then linked
    assert [ident for ident, _ in seen[1:]] == [fake.threads[1]] * 2


def _hold_one(client: TestClient, fake: FakeLinker, pool: ThreadPoolExecutor):  # type: ignore[no-untyped-def]
    """Start one request that takes the only slot and stays in the model until the gate opens."""
    first = pool.submit(client.post, "/v1/link", json={"mention": "Douglas Adams", "top_k": 1})
    eventually(lambda: fake.started == 1, "the first request to reach the model")
    return first


def test_a_full_server_refuses_before_decoding_even_bad_input(tmp_path: Path) -> None:
    """Decoding runs inside the admitted work, so a full server answers 429 before reading the request's text or
    image: a bad request to a full server gets 429 (not its 4xx), and an image costs no decoding at all."""
    gate = threading.Event()
    with serve(tmp_path, gate=gate, admission={"max_in_flight": 1, "max_queue": 0}) as (client, fake):
        with ThreadPoolExecutor(1) as pool:
            first = _hold_one(client, fake, pool)
            before = DECODE_COUNTS.snapshot()
            answers = [
                client.post("/v1/link", json={"mention": "a\x00b"}),  # its 4xx on a server with room: 422
                client.post("/v1/link", json={"mention": "ok", "image": "!!!!"}),  # 422 invalid_image
                client.post("/v1/link", json={"mention": "ok", "top_k": MAX_TOP_K + 1}),  # 422
                client.post("/v1/link", json={"mention": "ok", "image": b64(jpeg())}),  # a good image: 200
                client.post("/v1/link", data={"mention": "ok"}, files={"image": ("a.jpg", jpeg(), "image/jpeg")}),
                client.post("/v1/link/batch", json={"items": [{"mention": " "}]}),
            ]
            assert DECODE_COUNTS.snapshot() - before == DecodeCounts()  # no base64 read, no pixel decoded
            for r in answers:
                assert_error(r, 429, "overloaded", "server is at capacity, retry later")
                assert r.headers["retry-after"] == "1"
            # What is checked before admission still answers its own code on a full server.
            assert_error(client.post("/v1/link", content=b"{", headers=JSON), 422, "invalid_input")
            assert_error(client.post("/v1/link", content=b"x", headers={"content-type": "text/plain"}), 415,
                         "unsupported_media_type")
            assert_error(client.post("/v1/link/batch", json={"items": [{"mention": "x"}] * (MAX_BATCH + 1)}), 422,
                         "too_many_items")
            assert fake.started == 1
            gate.set()
            assert first.result().status_code == 200
        # With room again, the same bad request gets its own 4xx.
        assert_error(client.post("/v1/link", json={"mention": "a\x00b"}), 422, "invalid_input")
        assert metric(scrape(client), "el_rejections_total", reason="queue_full") == 6


def test_oversized_base64_is_refused_from_its_length(client: TestClient) -> None:
    before = DECODE_COUNTS.snapshot()
    r = client.post("/v1/link", json={"mention": "ok", "image": "A" * (6 * 1024 * 1024)})
    assert_error(r, 413, "image_too_large")
    assert DECODE_COUNTS.snapshot() - before == DecodeCounts()


# ------------------------------------------------------------------------------------------------ admission


def test_queued_request_is_served_after_the_running_one(tmp_path: Path) -> None:
    gate = threading.Event()
    with serve(tmp_path, gate=gate, admission={"max_in_flight": 1, "max_queue": 1}) as (client, fake):
        with ThreadPoolExecutor(2) as pool:
            first = _hold_one(client, fake, pool)
            second = pool.submit(client.post, "/v1/link", json={"mention": "Plato", "top_k": 1})
            eventually(lambda: metric(scrape(client), "el_queue_depth") == 1, "the second request to queue")
            assert_error(client.post("/v1/link", json={"mention": "x"}), 429, "overloaded")
            assert fake.started == 1  # the queued one has not reached the model
            gate.set()
            assert [first.result().json()["entities"][0]["id"], second.result().json()["entities"][0]["id"]] == \
                ["Q42", "Q859"]
        assert fake.started == 2
        assert [q[0].mention for q in fake.queries] == ["Douglas Adams", "Plato"]  # arrival order


def test_deadline_while_running_is_a_504_and_the_slot_stays_taken(tmp_path: Path) -> None:
    gate = threading.Event()
    with serve(tmp_path, gate=gate, admission={"max_in_flight": 1, "max_queue": 0, "request_timeout_s": 0.2}) as (
            client, fake):
        assert_error(client.post("/v1/link", json={"mention": "Douglas Adams"}), 504, "deadline_exceeded",
                     "request deadline exceeded")
        # The abandoned work still holds the only slot: the next request is refused at once.
        assert metric(scrape(client), "el_in_flight") == 1
        assert_error(client.post("/v1/link", json={"mention": "Douglas Adams"}), 429, "overloaded")
        gate.set()
        eventually(lambda: metric(scrape(client), "el_in_flight") == 0, "the abandoned work to end")
        assert metric(scrape(client), "el_rejections_total", reason="deadline_running") == 1
        assert fake.started == 1


def test_not_ready_answers_503_without_internals(tmp_path: Path) -> None:
    with serve(tmp_path, fail="manifest.json") as (client, _):
        assert client.get("/healthz").status_code == 200
        body = client.get("/readyz").json()
        assert body["status"] == "failed" and "manifest.json" in body["detail"]
        for r in (client.post("/v1/link", json={"mention": "Douglas Adams"}),
                  client.post("/v1/link/batch", json={"items": [{"mention": "Douglas Adams"}]}),
                  client.get("/v1/entities/Q42")):
            msg = assert_error(r, 503, "not_ready", "model or index failed to load")
            assert "/srv/secret" not in msg
            assert r.headers["retry-after"] == "5"


# ------------------------------------------------------------------------------------------- limits, auth


def test_body_cap(tmp_path: Path) -> None:
    cap = 4096
    with serve(tmp_path, limits={"max_body_bytes": cap}) as (client, _):
        body = json.dumps({"mention": "Douglas Adams", "top_k": 1}).encode()
        assert client.post("/v1/link", content=body + b" " * (cap - len(body)), headers=JSON).status_code == 200
        r = client.post("/v1/link", content=body + b" " * (cap + 1 - len(body)), headers=JSON)
        assert_error(r, 413, "payload_too_large", f"request body exceeds {cap} bytes")


def test_api_keys(tmp_path: Path) -> None:
    with serve(tmp_path, auth={"api_keys": [KEY]}) as (client, _):
        assert client.get("/healthz").status_code == 200  # probes stay open
        assert client.get("/readyz").status_code == 200
        for r in (client.post("/v1/link", json={"mention": "Plato"}),
                  client.post("/v1/link", json={"mention": "Plato"}, headers={"X-API-Key": "k-wrong"}),
                  client.get("/v1/jobs")):
            assert_error(r, 401, "unauthorized")
            assert KEY not in r.text
        assert client.post("/v1/link", json={"mention": "Plato"}, headers={"X-API-Key": KEY}).status_code == 200
        ok = client.post("/v1/link", json={"mention": "Plato"}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


def test_index_reload_swaps_or_refuses(app: tuple[TestClient, FakeLinker], tmp_path: Path) -> None:
    client, fake = app
    folder = tmp_path / "other-index"
    folder.mkdir()
    (folder / "entities.json").write_text(json.dumps([["E1", "Ada Lovelace", "Mathematician."]]))
    r = client.post("/v1/admin/reload", json={"index_dir": str(folder)})
    assert r.status_code == 200, r.text
    assert r.json()["previous_version"] == "fake-index@1" and r.json()["entities"] == 1
    assert client.post("/v1/link", json={"mention": "Ada Lovelace"}).json()["entities"][0]["id"] == "E1"
    msg = assert_error(client.post("/v1/admin/reload", json={"index_dir": str(tmp_path / "nope")}), 422,
                       "invalid_index")
    assert msg.startswith(f"index refused, still serving {r.json()['index_version']}"), msg
    assert fake.index.version == r.json()["index_version"]


# ------------------------------------------------------------------------------------------- job lifecycle


def _wait_job(client: TestClient, job_id: str, states: tuple[str, ...]) -> dict:
    job: dict = {}

    def reached() -> bool:
        nonlocal job
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job["state"] in states

    eventually(reached, f"job {job_id} to reach {states}")
    return job


def test_job_submit_poll_results_and_poison_items(client: TestClient) -> None:
    items = [{"id": f"i{n}", "mention": e.name, "top_k": 2} for n, e in enumerate(FAKE_KG[:5])]
    items.insert(2, {"id": "bad-image", "mention": "ok", "image": "!!!!"})
    items.insert(4, {"id": "bad-top-k", "mention": "ok", "top_k": MAX_TOP_K + 1})
    r = client.post("/v1/jobs", json={"items": items})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    job = _wait_job(client, job_id, ("succeeded", "failed", "cancelled"))
    assert job["state"] == "succeeded" and job["progress"] == {"done": 7, "total": 7, "failed": 2}
    res = client.get(f"/v1/jobs/{job_id}/results")
    assert res.status_code == 200 and res.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in res.text.splitlines()]
    assert [line["id"] for line in lines] == [i["id"] for i in items]
    by_id = {line["id"]: line for line in lines}
    assert by_id["bad-image"]["error"] == {"code": "invalid_image", "message": "image is not valid base64"}
    assert by_id["bad-top-k"]["error"]["code"] == "invalid_input"
    for n, e in enumerate(FAKE_KG[:5]):
        assert by_id[f"i{n}"]["result"]["entities"][0]["id"] == e.id
    # The same mention through /v1/link: the same ranking (one conversion, one pipeline behind both).
    single = client.post("/v1/link", json={"mention": FAKE_KG[0].name, "top_k": 2}).json()
    assert single["entities"] == by_id["i0"]["result"]["entities"]


def test_job_idempotency_not_finished_cancel_delete_and_unknown(tmp_path: Path) -> None:
    gate = threading.Event()
    with serve(tmp_path, gate=gate, jobs={"chunk_size": 1}) as (client, fake):
        items = [{"id": f"i{n}", "mention": "Plato"} for n in range(4)]
        first = client.post("/v1/jobs", json={"items": items}, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 202
        job_id = first.json()["job_id"]
        replay = client.post("/v1/jobs", json={"items": items}, headers={"Idempotency-Key": "k1"})
        assert (replay.status_code, replay.json()["job_id"]) == (200, job_id)
        assert_error(client.post("/v1/jobs", json={"items": items[:2]}, headers={"Idempotency-Key": "k1"}), 409,
                     "idempotency_conflict")
        eventually(lambda: fake.started == 1, "the worker to hold the first chunk")
        r = client.get(f"/v1/jobs/{job_id}/results")
        assert_error(r, 409, "job_not_finished")
        assert r.headers["retry-after"] == "2"
        cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        gate.set()
        lines = [json.loads(line) for line in client.get(f"/v1/jobs/{job_id}/results").text.splitlines()]
        # The chunk that was computing when the job was cancelled is discarded; no other chunk ran.
        assert lines == [{"id": i["id"], "error": {"code": "cancelled", "message": "the job was cancelled before "
                                                  "this item ran"}} for i in items]
        eventually(lambda: client.get("/metrics").status_code == 200 and fake.started == 1, "the worker to stop")
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204  # DELETE deletes: job and results
        assert_error(client.get(f"/v1/jobs/{job_id}"), 404, "job_not_found")
        assert_error(client.get(f"/v1/jobs/{job_id}/results"), 404, "job_not_found")
        assert_error(client.delete(f"/v1/jobs/{job_id}"), 404, "job_not_found")
        assert_error(client.get("/v1/jobs/nope"), 404, "job_not_found")
        assert_error(client.post("/v1/jobs", json={"items": []}), 422, "invalid_input")
        assert_error(client.post("/v1/jobs", json={"items": [{"id": "a", "mention": "x"}] * 2}), 422,
                     "duplicate_item_id")
