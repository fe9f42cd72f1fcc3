"""The OpenAPI document states what the server enforces, from the app's own Settings, and 405s name every
method of the path. No server process and no model: the document is built by `create_app(settings)`."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import InvalidInput, TextTooLong
from service.pipeline.decode import clean_text
from service.settings import Settings


def doc(**env: str) -> dict:
    return create_app(Settings(**env)).openapi()


def link_json(d: dict) -> dict:
    return d["paths"]["/v1/link"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]


def link_form(d: dict) -> dict:
    return d["paths"]["/v1/link"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]


def string_branch(prop: dict) -> dict:
    return next(b for b in prop.get("anyOf", [prop]) if b.get("type") == "string")


def integer_branch(prop: dict) -> dict:
    return next(b for b in prop.get("anyOf", [prop]) if b.get("type") == "integer")


def test_limits_in_the_document_follow_the_settings() -> None:
    default = doc()
    changed = doc(limits={"max_text_chars": 77, "max_top_k": 9, "max_batch_items": 5, "max_image_bytes": 3000},
                  top_k=5, jobs={"max_items": 11})
    for d, text, top_k, batch, image, job_items in ((default, 2000, 100, 32, 4 * 1024 * 1024, 1_000_000),
                                                     (changed, 77, 9, 5, 3000, 11)):
        props = link_json(d)
        assert props["mention"]["maxLength"] == text and props["mention"]["minLength"] == 1
        assert string_branch(props["context"])["maxLength"] == text
        assert (integer_branch(props["top_k"])["minimum"], integer_branch(props["top_k"])["maximum"]) == (1, top_k)
        assert string_branch(props["image"])["maxLength"] == 4 * (image // 3)
        form = link_form(d)
        assert form["additionalProperties"] is False and form["required"] == ["mention"]
        assert form["properties"]["mention"]["maxLength"] == text
        assert form["properties"]["top_k"]["maximum"] == top_k
        assert form["properties"]["image"]["maxLength"] == image
        batch_doc = d["components"]["schemas"]
        assert batch_doc["BatchLinkRequest"]["properties"]["items"]["maxItems"] == batch
        assert batch_doc["BatchItem"]["properties"]["mention"]["maxLength"] == text
        jobs = d["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
        assert jobs["application/json"]["schema"]["properties"]["items"]["maxItems"] == job_items
        assert jobs["multipart/form-data"]["schema"]["additionalProperties"] is False
        for path, method in (("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}", "delete"),
                             ("/v1/jobs/{job_id}/cancel", "post"), ("/v1/jobs/{job_id}/results", "get")):
            (param,) = d["paths"][path][method]["parameters"]
            assert param["schema"]["pattern"] == "^[0-9a-f]{32}$"


def test_two_apps_keep_their_own_documents() -> None:
    a = create_app(Settings(limits={"max_text_chars": 10}))
    b = create_app(Settings(limits={"max_text_chars": 20}))
    assert link_json(a.openapi())["mention"]["maxLength"] == 10
    assert link_json(b.openapi())["mention"]["maxLength"] == 20
    assert link_form(a.openapi())["properties"]["mention"]["maxLength"] == 10


@pytest.mark.parametrize(("value", "accepted"), [
    ("Berlin", True), ("  Berlin\t", True), ("a\u3000b", True), ("\u00e9", True),
    ("", False), ("   ", False), ("\t\r\n", False), ("\u3000\u2003", False), ("a\x00b", False), ("a\x85", False),
    ("\x7f", False),
])
def test_the_mention_pattern_says_what_clean_text_accepts(value: str, accepted: bool) -> None:
    mention = link_json(doc())["mention"]
    in_schema = re.fullmatch(mention["pattern"], value) is not None and len(value) >= mention["minLength"]
    try:
        clean_text(value, field="mention", max_chars=2000, required=True)
        served = True
    except (InvalidInput, TextTooLong):
        served = False
    assert in_schema == served == accepted


def test_a_max_length_text_is_accepted_even_when_nfc_lengthens_it() -> None:
    # U+0958 has no composed form under NFC: it becomes two characters. maxLength counts the characters sent.
    assert len(clean_text("\u0958" * 10, field="mention", max_chars=10)) == 20
    with pytest.raises(TextTooLong):
        clean_text("\u0958" * 11, field="mention", max_chars=10)


def test_context_pattern_allows_blank_but_not_control_characters() -> None:
    pattern = string_branch(link_json(doc())["context"])["pattern"]
    assert re.fullmatch(pattern, "") and re.fullmatch(pattern, "  \n") and not re.fullmatch(pattern, "a\x1bb")


def test_405_names_every_method_of_the_path() -> None:
    client = TestClient(create_app(Settings()))  # no lifespan: routing answers before any handler runs
    cases = {"/v1/jobs": {"GET", "POST"}, "/v1/jobs/" + "0" * 32: {"GET", "DELETE"},
             "/v1/jobs/" + "0" * 32 + "/cancel": {"POST"}, "/v1/link": {"POST"}}
    for path, methods in cases.items():
        r = client.request("PATCH", path)
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed", r.text
        allow = {m.strip() for m in r.headers["allow"].split(",")}
        assert allow - {"HEAD"} == methods, (path, allow)
        documented = {m.upper() for m in client.app.openapi()["paths"][path.replace("0" * 32, "{job_id}")]}
        assert allow - {"HEAD"} == documented


def test_link_answers_keep_their_documented_schemas() -> None:
    """/v1/link and /v1/link/batch return their JSON themselves (service/routes/link.py `json_response`): the
    document must still name the answer's schema for both."""
    d = doc()
    for path, schema in (("/v1/link", "ExplainedLinkResponse"), ("/v1/link/batch", "BatchLinkResponse")):
        ok = d["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{schema}"}, (path, ok)
