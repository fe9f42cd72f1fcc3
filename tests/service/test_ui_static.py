"""The web page's HTTP side, in-process over the fake backend: / redirects to the page, the page and its files are
served from the package without a key (nothing from a CDN), explain=true reaches the pipeline and is off by default,
the entity image route answers its stable 404s, and the page has a readable message for every stable error code.
The page itself is driven in a real browser by tests/service/test_ui_browser.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.routes.ui import STATIC
from tests.service.test_api_fake import DOUGLAS, KEY, serve

ROOT = Path(__file__).resolve().parents[2]


def _api_codes() -> set[str]:
    """Every stable code the API can answer: the ELError subclasses (service/errors.py) and the codes the app's
    own handlers write (service/app.py: the literal "code" values and the HTTP-status map)."""
    from service.errors import ELError

    todo, codes = [ELError], set()
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo += cls.__subclasses__()
    app = (ROOT / "service/app.py").read_text()
    codes |= set(re.findall(r'"code": "([a-z_]+)"', app))
    for line in app.splitlines():
        if line.strip().startswith("code = {"):  # {404: "not_found", 405: ...}.get(status, "http_error")
            codes |= set(re.findall(r'"([a-z_]+)"', line))
    return codes


def test_every_error_code_has_a_readable_message() -> None:
    js = (STATIC / "errors.js").read_text()
    mapped = set(re.findall(r"^\s+([a-z_]+): \"", js, re.MULTILINE))
    codes = _api_codes()
    assert {"unsupported_image_format", "unauthorized", "internal", "http_error", "not_found"} <= codes
    assert codes - mapped == set(), f"codes without a message in errors.js: {sorted(codes - mapped)}"


def test_page_ships_offline() -> None:
    """Every script, style and font the page loads is one of its own files: no http(s) URL anywhere."""
    html = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(not r.startswith(("http:", "https:", "//")) for r in refs)
    for r in refs:
        assert (STATIC.parent / r).is_file(), r  # static/... relative to the page at /ui/
    for f in STATIC.iterdir():
        assert not re.search(r"https?://", f.read_text()), f"{f.name} names a remote URL"
        assert "@import" not in f.read_text() and "@font-face" not in f.read_text()


def test_pyproject_ships_the_page_as_package_data() -> None:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "ui/static/*" in data["service"]


@pytest.mark.parametrize("keys", [[], [KEY]])
def test_page_and_files_are_served_without_a_key(tmp_path: Path, keys: list[str]) -> None:
    with serve(tmp_path, auth={"api_keys": keys}) as (client, _):
        r = client.get("/", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "ui/"
        r = client.get("/ui/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "<textarea id=\"sentence\"" in r.text
        for name, ctype in (("app.js", "javascript"), ("errors.js", "javascript"), ("style.css", "text/css")):
            r = client.get(f"/ui/static/{name}")
            assert r.status_code == 200 and ctype in r.headers["content-type"], name
        assert client.get("/ui/static/nope.js").status_code == 404
        # The API behind it still wants the key.
        r = client.post("/v1/link", json=DOUGLAS)
        assert r.status_code == (401 if keys else 200)
        assert "/ui/" not in client.get("/openapi.json").json()["paths"]


def test_explain_is_a_documented_query_flag_off_by_default(tmp_path: Path) -> None:
    with serve(tmp_path) as (client, linker):
        doc = client.get("/openapi.json").json()
        params = {p["name"]: p for p in doc["paths"]["/v1/link"]["post"]["parameters"]}
        assert params["explain"]["in"] == "query" and params["explain"]["schema"]["default"] is False
        assert "transport plan" in params["explain"]["description"]
        assert "CandidateAlignment" in doc["components"]["schemas"]

        r = client.post("/v1/link", json=DOUGLAS)
        assert r.status_code == 200 and "explain" not in r.json()  # the answer is unchanged without it
        assert linker.queries[-1][0].explain is False
        r = client.post("/v1/link?explain=true", json=DOUGLAS)
        assert r.status_code == 200
        assert linker.queries[-1][0].explain is True
        r = client.post("/v1/link?explain=maybe", json=DOUGLAS)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
        # The batch route has no such flag: its items never ask for plans.
        r = client.post("/v1/link/batch", json={"items": [DOUGLAS]})
        assert r.status_code == 200 and "explain" not in r.json()["results"][0]


def test_entity_image_route_errors(tmp_path: Path) -> None:
    with serve(tmp_path) as (client, linker):
        r = client.get("/v1/entities/Q-nope/image")
        assert r.status_code == 404 and r.json()["error"]["code"] == "entity_not_found"
        no_image = next(e for e in linker.index.entities if not e.has_image)
        r = client.get(f"/v1/entities/{no_image.id}/image")
        assert r.status_code == 404 and r.json()["error"]["code"] == "entity_image_not_found"
