"""The HTTP API over real HTTP: `python -m service serve` in a subprocess, real ONNX encoders, a real index.

Every error answer is asserted by status and by the exact `{"error": {"code", "message"}}` shape.
Servers with other caps (body cap, empty index, tight admission, short deadline) are class-scoped so that each
stops as soon as its tests are done. The pure request-shape cases (bad JSON and raw bodies, batch validation,
404/405) run in tests/service/test_api_fake.py over the fake backend: the real encoders add nothing to them.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.server_process import metric, scrape
from tests.service.conftest import Server, running_server

pytestmark = [pytest.mark.slow, pytest.mark.onnx]

JSON = {"content-type": "application/json"}
MAX_TEXT = 2000  # LimitSettings defaults
MAX_TOP_K = 100
MAX_BATCH = 32
MAX_IMAGE_BYTES = 4 * 1024 * 1024
DOUGLAS = {"mention": "Douglas Adams", "context": "Douglas Adams wrote The Hitchhiker's Guide to the Galaxy."}


# ------------------------------------------------------------------------------------------------ helpers


def assert_error(r: httpx.Response, status: int, code: str, message: str | None = None) -> str:
    """The exact error shape; returns the message (checked exactly when given)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    msg = body["error"]["message"]
    assert isinstance(msg, str) and msg, body
    if message is not None:
        assert msg == message, body
    return msg


def png_header(width: int, height: int) -> bytes:
    """A 33-byte PNG: signature and IHDR only, declaring width x height (reliability D1)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="GIF")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def top(entities: list[dict]) -> dict:
    return {e["id"]: e for e in entities}


@pytest.fixture(scope="module")
def q42_jpeg(settings) -> bytes:
    path = Path(settings.data_dir) / "RichpediaMEL" / "images" / "Q42.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path.read_bytes()


@pytest.fixture(scope="module")
def versions(client: httpx.Client) -> dict:
    r = client.get("/readyz")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def gold_mentions(client: httpx.Client, test_mentions) -> list:
    """Real WikiMEL test mentions whose gold entity is in the index under exactly the mention's surface form."""
    chosen = []
    for m in test_mentions:
        r = client.get(f"/v1/entities/{m.answer}")
        if r.status_code == 200 and r.json()["name"] == m.mention:
            chosen.append(m)
    assert len(chosen) >= 5, "the small index should hold several exactly-named gold entities"
    return chosen[:8]


# -------------------------------------------------------------------------------------------- health, docs


def test_healthz(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_readyz_reports_versions(client: httpx.Client) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    assert isinstance(body["index_version"], str) and body["index_version"]
    assert isinstance(body["model_version"], str) and body["model_version"]
    assert body["detail"] is None


def test_openapi_lists_the_routes(client: httpx.Client) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert {"/v1/link", "/v1/link/batch", "/v1/entities/{entity_id}"} <= set(paths)
    link_body = paths["/v1/link"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(link_body)
    assert "mention" in link_body["application/json"]["schema"]["properties"]
    assert link_body["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert "post" in paths["/v1/link/batch"]
    assert "get" in paths["/v1/entities/{entity_id}"]


# ------------------------------------------------------------------------------------------------- linking


def test_link_finds_gold_entities(client: httpx.Client, gold_mentions) -> None:
    for m in gold_mentions:
        r = client.post("/v1/link", json={"mention": m.mention, "context": m.context})
        assert r.status_code == 200, r.text
        ids = [e["id"] for e in r.json()["entities"]]
        assert m.answer in ids, (m.mention, m.answer, ids)


def test_link_response_fields_and_order(client: httpx.Client, versions: dict) -> None:
    r = client.post("/v1/link", json={**DOUGLAS, "top_k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"mention", "entities", "confidence", "nil", "index_version", "model_version", "timings_ms"}
    assert body["mention"] == "Douglas Adams"
    assert body["nil"] is False
    assert body["index_version"] == versions["index_version"]
    assert body["model_version"] == versions["model_version"]
    assert {"encode", "retrieve", "rerank", "total"} <= set(body["timings_ms"])
    assert all(v >= 0 for v in body["timings_ms"].values())
    assert body["timings_ms"]["total"] >= body["timings_ms"]["encode"]
    ents = body["entities"]
    assert len(ents) == 5
    for e in ents:
        assert {"id", "name", "score", "retrieval_score", "rerank_score", "name_score", "context_name_score",
                "name_tokens_score", "before_birth_score", "after_death_score", "description_overlap_score"} <= set(e)
        assert isinstance(e["id"], str) and isinstance(e["name"], str)
        assert all(isinstance(e[k], float) for k in ("score", "retrieval_score", "rerank_score"))
    scores = [e["score"] for e in ents]
    assert scores == sorted(scores, reverse=True)
    assert len({e["id"] for e in ents}) == 5
    assert ents[0]["id"] == "Q42" and ents[0]["name"] == "Douglas Adams"


def test_link_confidence_and_nil_follow_the_shipped_rule(client: httpx.Client, settings, test_mentions) -> None:
    """Every served link carries a confidence in [0, 1]; both it and `nil` are what the shipped calibration
    (models/weights/calibration.json) gives for the candidates' scores (all of them returned: top_k = candidates)."""
    import numpy as np

    from kg_index.load import load_index
    from models.checkpoint import WEIGHTS_DIR
    from service.pipeline.calibration import SCORE_FIELDS, Calibration, mention_facts
    from service.pipeline.mention_prior import MentionPrior, prior_path

    cal = Calibration.load(WEIGHTS_DIR / "calibration.json")
    prior = MentionPrior.load(prior_path(WEIGHTS_DIR / "calibration.json"))
    k = settings.rerank.candidates
    items = [{"id": str(i), "mention": m.mention, "context": m.context, "top_k": k} for i, m in enumerate(test_mentions[:24])]
    r = client.post("/v1/link/batch", json={"items": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    table = np.full((len(results), k, len(SCORE_FIELDS)), np.nan, np.float32)
    for i, res in enumerate(results):
        for c, e in enumerate(res["entities"]):
            table[i, c] = [e[f] for f in SCORE_FIELDS]
    index = load_index(settings.index.dir)
    entities = {e.id: e for e in index.entities}
    facts = mention_facts([res["mention"] for res in results],
                          [entities[res["entities"][0]["id"]] if res["entities"] else None for res in results],
                          prior, index.row_of.__contains__, index.version, len(index))
    confidence, answerable = cal.assess([res["mention"] for res in results], table, facts)
    assert [res["confidence"] for res in results] == pytest.approx(confidence.tolist(), abs=1e-4)
    assert all(0.0 <= res["confidence"] <= 1.0 for res in results)
    assert [res["nil"] for res in results] == (answerable < cal.nil_threshold).tolist()
    one = client.post("/v1/link", json={**DOUGLAS, "top_k": 1}).json()  # top_k 1: the rule still reads every candidate
    assert one["nil"] is False and 0.5 < one["confidence"] <= 1.0


def test_link_text_is_normalised(client: httpx.Client) -> None:
    r = client.post("/v1/link", json={"mention": "  Douglas \t Adams\n", "top_k": 1})
    assert r.status_code == 200, r.text
    assert r.json()["mention"] == "Douglas Adams"


@pytest.mark.parametrize("top_k", [1, 7, MAX_TOP_K])
def test_link_top_k_respected(client: httpx.Client, top_k: int) -> None:
    r = client.post("/v1/link", json={**DOUGLAS, "top_k": top_k})
    assert r.status_code == 200, r.text
    ents = r.json()["entities"]
    assert len(ents) == top_k
    scores = [e["score"] for e in ents]
    assert scores == sorted(scores, reverse=True)


def test_link_default_top_k(client: httpx.Client, settings) -> None:
    r = client.post("/v1/link", json=DOUGLAS)
    assert r.status_code == 200, r.text
    assert len(r.json()["entities"]) == settings.top_k


def test_image_by_multipart_and_base64(client: httpx.Client, q42_jpeg: bytes) -> None:
    text_only = client.post("/v1/link", json={**DOUGLAS, "top_k": 5})
    as_b64 = client.post("/v1/link", json={**DOUGLAS, "top_k": 5, "image": b64(q42_jpeg)})
    as_url = client.post("/v1/link", json={**DOUGLAS, "top_k": 5, "image": "data:image/jpeg;base64," + b64(q42_jpeg)})
    as_file = client.post("/v1/link", data={**DOUGLAS, "top_k": "5"}, files={"image": ("Q42.jpg", q42_jpeg, "image/jpeg")})
    for r in (text_only, as_b64, as_url, as_file):
        assert r.status_code == 200, r.text
        assert r.json()["entities"][0]["id"] == "Q42"
        assert len(r.json()["entities"]) == 5
    t, b, u, f = (top(r.json()["entities"]) for r in (text_only, as_b64, as_url, as_file))
    # The same bytes give the same answer whichever way they travel.
    for other in (u, f):
        assert list(other) == list(b)
        for eid in b:
            assert other[eid]["score"] == pytest.approx(b[eid]["score"], abs=1e-5)
    # The image moves Q42 (an entity with an image): both retrieval and the OT unit see it.
    assert abs(b["Q42"]["score"] - t["Q42"]["score"]) > 1e-3
    assert abs(b["Q42"]["retrieval_score"] - t["Q42"]["retrieval_score"]) > 1e-3
    assert abs(b["Q42"]["rerank_score"] - t["Q42"]["rerank_score"]) > 1e-3


def test_multipart_without_image(client: httpx.Client) -> None:
    boundary = "xyz"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="mention"\r\n\r\nDouglas Adams\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n2\r\n--{boundary}--\r\n').encode()
    r = client.post("/v1/link", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    assert [e["id"] for e in r.json()["entities"]][:1] == ["Q42"]
    assert len(r.json()["entities"]) == 2


# --------------------------------------------------------------------------------------------------- batch


def test_batch_in_input_order_with_ids(client: httpx.Client, gold_mentions, versions: dict) -> None:
    items = [{"id": f"m{i}", "mention": m.mention, "context": m.context, "top_k": 3}
             for i, m in enumerate(reversed(gold_mentions))]
    items.append({"mention": "Douglas Adams", "top_k": 2})  # no id: echoed as null
    r = client.post("/v1/link/batch", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "index_version", "model_version", "timings_ms"}
    assert body["index_version"] == versions["index_version"]
    assert body["model_version"] == versions["model_version"]
    assert {"encode", "retrieve", "rerank", "total"} <= set(body["timings_ms"])
    results = body["results"]
    assert [res["id"] for res in results] == [it.get("id") for it in items]
    assert [res["mention"] for res in results] == [it["mention"] for it in items]
    for m, res in zip(reversed(gold_mentions), results, strict=False):
        assert len(res["entities"]) == 3
        assert m.answer in [e["id"] for e in res["entities"]], (m.mention, res["entities"])
    assert len(results[-1]["entities"]) == 2
    assert results[-1]["entities"][0]["id"] == "Q42"


def test_batch_at_the_item_cap(client: httpx.Client) -> None:
    items = [{"id": str(i), "mention": "Douglas Adams", "top_k": 1} for i in range(MAX_BATCH)]
    r = client.post("/v1/link/batch", json={"items": items})
    assert r.status_code == 200, r.text
    assert [res["id"] for res in r.json()["results"]] == [str(i) for i in range(MAX_BATCH)]


def test_entity_found(client: httpx.Client) -> None:
    r = client.get("/v1/entities/Q42")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "name", "description", "has_image"}
    assert body["id"] == "Q42"
    assert body["name"] == "Douglas Adams"
    assert isinstance(body["description"], str)
    assert body["has_image"] is True


def test_entity_not_found(client: httpx.Client, versions: dict) -> None:
    r = client.get("/v1/entities/Q0nope")
    assert_error(r, 404, "entity_not_found", f"no entity with id 'Q0nope' in index {versions['index_version']}")


# ----------------------------------------------------------------------------------------------- bad input


def test_random_bytes_as_image(client: httpx.Client) -> None:
    noise = random.Random(0).randbytes(4096)
    for r in (client.post("/v1/link", json={"mention": "ok", "image": b64(noise)}),
              client.post("/v1/link", data={"mention": "ok"}, files={"image": ("x.jpg", noise, "image/jpeg")})):
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["code"] in {"invalid_image", "unsupported_image_format"}


def test_truncated_jpeg(client: httpx.Client, q42_jpeg: bytes) -> None:
    r = client.post("/v1/link", json={"mention": "ok", "image": b64(q42_jpeg[: len(q42_jpeg) // 3])})
    assert 400 <= r.status_code < 500 or r.status_code == 200, r.text  # Pillow may pad a truncated scan
    if r.status_code != 200:
        assert r.json()["error"]["code"] == "invalid_image"


def test_png_bomb_header(client: httpx.Client) -> None:
    header = png_header(50_000, 50_000)
    for send in (lambda: client.post("/v1/link", json={"mention": "ok", "image": b64(header)}),
                 lambda: client.post("/v1/link", data={"mention": "ok"}, files={"image": ("b.png", header, "image/png")})):
        before = scrape(client)
        r = send()
        after = scrape(client)
        msg = assert_error(r, 413, "image_too_large")
        assert msg.startswith("image is 50000x50000 = 2500000000 pixels"), msg
        for work in ("el_image_decodes_total", "el_image_pixels_decoded_total", "el_model_invocations_total"):
            assert metric(after, work) == metric(before, work), work  # refused from the header alone


def test_gif_is_unsupported(client: httpx.Client) -> None:
    gif = gif_bytes()
    for r in (client.post("/v1/link", json={"mention": "ok", "image": b64(gif)}),
              client.post("/v1/link", data={"mention": "ok"}, files={"image": ("a.gif", gif, "image/gif")})):
        msg = assert_error(r, 415, "unsupported_image_format")
        assert msg.startswith("image format GIF is not supported"), msg


def test_image_over_the_byte_cap(client: httpx.Client) -> None:
    big = b"\xff\xd8\xff" + b"\x00" * MAX_IMAGE_BYTES
    assert_error(client.post("/v1/link", json={"mention": "ok", "image": b64(big)}), 413, "image_too_large")
    r = client.post("/v1/link", data={"mention": "ok"}, files={"image": ("big.jpg", big, "image/jpeg")})
    assert_error(r, 413, "image_too_large", f"image exceeds {MAX_IMAGE_BYTES} bytes")


def test_bad_multipart(client: httpx.Client) -> None:
    r = client.post("/v1/link", data={"context": "no mention"}, files={"image": ("a.gif", b"x", "image/gif")})
    assert_error(r, 422, "invalid_input", "mention: Field required")
    r = client.post("/v1/link", data={"mention": "ok", "top_k": "0"}, files={"image": ("a.gif", b"x", "image/gif")})
    msg = assert_error(r, 422, "invalid_input")
    assert msg.startswith("top_k:"), msg
    r = client.post("/v1/link", data={"mention": " "}, files={"image": ("a.gif", b"x", "image/gif")})
    assert_error(r, 422, "invalid_input", "mention must not be empty")
    for body, ctype in ((b"garbage", "multipart/form-data"), (b"garbage", "multipart/form-data; boundary=xyz")):
        r = client.post("/v1/link", content=body, headers={"content-type": ctype})
        assert 400 <= r.status_code < 500, r.text
        assert set(r.json()["error"]) == {"code", "message"}
    r = client.post("/v1/link", files={"mention": (None, "ok"), "lang": (None, "en")})  # as JSON's extra=forbid
    assert_error(r, 422, "invalid_input", "lang: unknown form field; send mention, context, top_k, image")
    files = [("image", ("a.jpg", b"x", "image/jpeg")), ("image", ("b.jpg", b"x", "image/jpeg"))]
    r = client.post("/v1/link", data={"mention": "ok"}, files=files)
    assert 400 <= r.status_code < 500, r.text


def test_no_5xx_so_far(client: httpx.Client) -> None:
    """Runs after the bad-input tests above (file order): none of them produced a 5xx."""
    samples = scrape(client)
    fives = {lab: v for (n, lab), v in samples.items()
             if n == "el_requests_total" and dict(lab)["status"].startswith("5") and dict(lab)["route"] != "/readyz"}
    assert fives == {}


# ------------------------------------------------------------------------------------------------- metrics


def test_metrics_move(client: httpx.Client, q42_jpeg: bytes) -> None:
    before = scrape(client)
    assert metric(before, "el_ready") == 1.0
    assert client.post("/v1/link", json={**DOUGLAS, "image": b64(q42_jpeg)}).status_code == 200
    assert client.post("/v1/link", json={"mention": ""}).status_code == 422
    items = [{"mention": "Douglas Adams"}, {"mention": "Abraham Lincoln"}, {"mention": "Plato"}]
    assert client.post("/v1/link/batch", json={"items": items}).status_code == 200
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("el_requests_total", route="/v1/link", method="POST", status="200") == 1
    assert delta("el_requests_total", route="/v1/link", method="POST", status="422") == 1
    assert delta("el_requests_total", route="/v1/link/batch", method="POST", status="200") == 1
    assert delta("el_request_latency_seconds_count", route="/v1/link") == 2
    assert delta("el_stage_latency_seconds_count", stage="encode") == 2  # one per pipeline batch
    assert delta("el_stage_latency_seconds_count", stage="rerank") == 2
    for part in ("rerank_gather", "rerank_sinkhorn", "rerank_pool", "rerank_strings", "rerank_kg"):
        assert delta("el_stage_latency_seconds_count", stage=part) == 2  # where the rerank time goes
    assert delta("el_sinkhorn_problems_total") >= 4  # at least one OT problem per mention
    assert delta("el_exact_search_queries_total") == 4  # one search per mention, whichever kernel answered it
    assert delta("el_exact_search_fp32_researches_total") == 0
    assert delta("el_sinkhorn_iterations_count") >= 2
    assert delta("el_mentions_linked_total", source="link") == 1
    assert delta("el_mentions_linked_total", source="batch") == 3
    assert metric(after, "el_queue_depth") == 0
    assert metric(after, "el_in_flight") == 0


# --------------------------------------------------------------------------------------------- body cap


class TestBodyCap:
    CAP = 4096

    @pytest.fixture(scope="class")
    def capped(self, settings) -> Server:
        with running_server(settings, EL_LIMITS__MAX_BODY_BYTES=self.CAP) as server:
            yield server

    def _body(self, size: int) -> bytes:
        body = json.dumps({"mention": "Douglas Adams", "top_k": 1}).encode()
        return body + b" " * (size - len(body))

    def test_at_the_cap_is_served(self, capped: Server) -> None:
        with capped.client() as c:
            r = c.post("/v1/link", content=self._body(self.CAP), headers=JSON)
        assert r.status_code == 200, r.text

    def test_over_the_cap_with_content_length(self, capped: Server) -> None:
        body = self._body(self.CAP + 1)
        with capped.client() as c:
            r = c.post("/v1/link", content=body, headers=JSON)
        assert r.request.headers["content-length"] == str(self.CAP + 1)
        assert_error(r, 413, "payload_too_large", f"request body exceeds {self.CAP} bytes")

    @pytest.mark.parametrize("path", ["/v1/link", "/v1/link/batch"])
    def test_over_the_cap_chunked(self, capped: Server, path: str) -> None:
        body = self._body(self.CAP + 1)

        def chunks():
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        with capped.client() as c:
            r = c.post(path, content=chunks(), headers=JSON)
        assert "content-length" not in r.request.headers
        assert r.request.headers["transfer-encoding"] == "chunked"
        assert_error(r, 413, "payload_too_large", f"request body exceeds {self.CAP} bytes")

    def test_large_multipart_and_still_healthy(self, capped: Server, q42_jpeg: bytes) -> None:
        with capped.client() as c:
            r = c.post("/v1/link", data={"mention": "Douglas Adams"}, files={"image": ("Q42.jpg", q42_jpeg, "image/jpeg")})
            assert_error(r, 413, "payload_too_large", f"request body exceeds {self.CAP} bytes")
            assert c.get("/healthz").status_code == 200
            assert c.post("/v1/link", json={"mention": "Douglas Adams"}).status_code == 200


# ------------------------------------------------------------------------------------ readiness (no index)


class TestNotReady:
    @pytest.fixture(scope="class")
    def unready(self, settings, tmp_path_factory: pytest.TempPathFactory) -> Server:
        empty = tmp_path_factory.mktemp("empty-index")
        with running_server(settings, ready=False, EL_INDEX__DIR=empty) as server:
            yield server

    def test_liveness_up_readiness_failed(self, unready: Server) -> None:
        with unready.client() as c:
            assert c.get("/healthz").status_code == 200
            r = c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "failed"
        assert "manifest.json" in body["detail"]
        assert body["index_version"] is None and body["model_version"] is None

    def test_routes_answer_not_ready(self, unready: Server) -> None:
        with unready.client() as c:
            for r in (c.post("/v1/link", json={"mention": "Douglas Adams"}),
                      c.post("/v1/link/batch", json={"items": [{"mention": "Douglas Adams"}]}),
                      c.get("/v1/entities/Q42")):
                assert_error(r, 503, "not_ready")
                assert r.headers["retry-after"] == "5"
            assert metric(scrape(c), "el_ready") == 0

    def test_not_ready_message_hides_internals(self, unready: Server) -> None:
        """Regression: the client's 503 once carried the raw start-up exception (the server's index path)."""
        index_dir = unready.env["EL_INDEX__DIR"]
        with unready.client() as c:
            msg = assert_error(c.post("/v1/link", json={"mention": "Douglas Adams"}), 503, "not_ready")
        assert index_dir not in msg and "start-up failed" not in msg, msg


# ------------------------------------------------------------------------------------ admission, deadline


def _fire(server: Server, n: int, stagger_s: float, body: dict) -> list[tuple[httpx.Response, float, float]]:
    """n concurrent POST /v1/link, the i-th sent i * stagger_s after the first; (response, sent, answered) each,
    as `time.perf_counter()` readings of this process, for ordering: which answer came before which."""
    clients = [server.client() for _ in range(n)]
    for c in clients:  # open the connections first so that only the requests race
        assert c.get("/healthz").status_code == 200
    start = time.perf_counter()

    def one(i: int) -> tuple[httpx.Response, float, float]:
        time.sleep(max(0.0, start + i * stagger_s - time.perf_counter()))
        t0 = time.perf_counter()
        r = clients[i].post("/v1/link", json=body)
        return r, t0, time.perf_counter()

    try:
        with ThreadPoolExecutor(n) as ex:
            return list(ex.map(one, range(n)))
    finally:
        for c in clients:
            c.close()


def _eventually(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll until `condition` holds; the timeout only catches a hung server."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.02)


# The stage delay (EL_STAGE_DELAY_MS) keeps a served request in the pipeline for a known time. The tests below
# prove "refused at once", "answered at the deadline" and "probes answered while busy" by ORDER (this answer came
# while that work was still running, as the server's own in-flight gauge or another answer shows), never by a
# stopwatch; the delay is long enough (seconds) that only the failure guarded against can cross it.


class TestOverload:
    DELAY_S = 1.5

    @pytest.fixture(scope="class")
    def tight(self, settings) -> Server:
        with running_server(settings, EL_ADMISSION__MAX_IN_FLIGHT=1, EL_ADMISSION__MAX_QUEUE=1,
                            EL_STAGE_DELAY_MS=int(self.DELAY_S * 1000)) as server:
            yield server

    def test_burst_over_capacity(self, tight: Server) -> None:
        with tight.client() as c:
            before = scrape(c)
        # A small stagger keeps each arrival in its own event-loop turn (test_admission.py covers the same-turn
        # case); all six still overlap the first request's stage delay.
        out = _fire(tight, 6, 0.02, {"mention": "Douglas Adams", "top_k": 1})
        seen = [(r.status_code, round(sent, 3), round(done, 3)) for r, sent, done in out]
        assert sorted(r.status_code for r, _, _ in out) == [200, 200, 429, 429, 429, 429], seen
        for r, _, _ in out:
            if r.status_code == 429:
                assert_error(r, 429, "overloaded", "server is at capacity, retry later")
                assert r.headers["retry-after"] == "1"
            else:
                assert r.json()["entities"][0]["id"] == "Q42"
        served = sorted((done, done - sent) for r, sent, done in out if r.status_code == 200)
        assert served[1][1] >= 2 * self.DELAY_S * 0.9, seen  # the queued one waited for the first
        # Every refusal is immediate (never queued): it is answered while the first request is still running.
        assert max(done for r, _, done in out if r.status_code == 429) < served[0][0], seen
        with tight.client() as c:
            after = scrape(c)
        rejected = metric(after, "el_rejections_total", reason="queue_full") - metric(
            before, "el_rejections_total", reason="queue_full")
        assert rejected == 4
        assert metric(after, "el_queue_depth") == 0
        assert metric(after, "el_in_flight") == 0
        assert metric(after, "el_requests_total", status="500") == 0

    def test_liveness_while_saturated(self, tight: Server) -> None:
        with ThreadPoolExecutor(2) as ex:
            busy = ex.submit(_fire, tight, 2, 0.02, {"mention": "Douglas Adams", "top_k": 1})
            probes_done = []
            with tight.client() as c:
                _eventually(lambda: metric(scrape(c), "el_in_flight") == 1, "a request in flight")
                for _ in range(10):
                    assert c.get("/healthz").status_code == 200
                    probes_done.append(time.perf_counter())
                    time.sleep(0.02)
            out = busy.result()
        assert [r.status_code for r, _, _ in out] == [200, 200]
        first_done = min(done for _, _, done in out)
        # Every probe was answered while the first request was still in its stage delay, not after it.
        assert max(probes_done) < first_done, (probes_done, first_done)


class TestDeadline:
    TIMEOUT_S = 0.3
    DELAY_S = 2.0

    @pytest.fixture(scope="class")
    def slow(self, settings) -> Server:
        with running_server(settings, EL_ADMISSION__REQUEST_TIMEOUT_S=self.TIMEOUT_S,
                            EL_STAGE_DELAY_MS=int(self.DELAY_S * 1000), EL_ADMISSION__MAX_IN_FLIGHT=1,
                            EL_ADMISSION__MAX_QUEUE=0) as server:
            yield server

    def test_deadline_exceeded(self, slow: Server) -> None:
        with slow.client() as c:
            before = scrape(c)
            t0 = time.perf_counter()
            r = c.post("/v1/link", json={"mention": "Douglas Adams"})
            elapsed = time.perf_counter() - t0
            during = scrape(c)
            assert_error(r, 504, "deadline_exceeded", "request deadline exceeded")
            assert elapsed >= self.TIMEOUT_S * 0.9, elapsed  # not before its deadline
            # Answered at the deadline, not when the work ends: the abandoned work still holds its slot.
            assert metric(during, "el_in_flight") == 1
            _eventually(lambda: metric(scrape(c), "el_in_flight") == 0, "the work to end")
            after = scrape(c)
            assert c.get("/healthz").status_code == 200
        assert metric(after, "el_rejections_total", reason="deadline_running") - metric(
            before, "el_rejections_total", reason="deadline_running") == 1
        assert metric(after, "el_requests_total", route="/v1/link", status="504") - metric(
            before, "el_requests_total", route="/v1/link", status="504") == 1

    def test_slot_held_until_abandoned_work_ends(self, slow: Server) -> None:
        """Regression: the slot was released at the deadline while the worker thread still ran, so the next request
        slipped past the queue cap, waited on the thread limiter and got a late 504 instead of a fast 429."""
        with slow.client() as c:
            assert c.post("/v1/link", json={"mention": "Douglas Adams"}).status_code == 504
            # The first request's worker still runs (its stage delay): in-flight 1 of 1, queue cap 0.
            r = c.post("/v1/link", json={"mention": "Douglas Adams"})
            during = scrape(c)
            assert_error(r, 429, "overloaded")
            assert metric(during, "el_in_flight") == 1  # refused while the abandoned work still ran
            _eventually(lambda: metric(scrape(c), "el_in_flight") == 0, "the work to end")
