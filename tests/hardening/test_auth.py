"""Optional API keys and CORS, in-process (the app with the session's real Linker): every protected route
answers 401 without a valid key, probes stay open, keys never reach logs or bodies, comparison is constant
time over all keys; CORS is off unless origins are configured, then exactly those."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service import auth
from service.app import create_app
from service.settings import AuthSettings, CorsSettings, JobSettings, Settings

pytestmark = [pytest.mark.slow, pytest.mark.onnx]

KEYS = ["k-alpha-7f3c91e2", "k-beta-0b5d44aa"]
WRONG = "k-wrong-deadbeef"
UNAUTHORIZED = {"error": {"code": "unauthorized",
                          "message": "missing or invalid API key; send 'Authorization: Bearer <key>' or "
                                     "'X-API-Key: <key>'"}}
LINK = {"mention": "Douglas Adams", "top_k": 1}


@contextmanager
def app_client(settings: Settings, linker, tmp_path: Path, **groups: object) -> Iterator[TestClient]:
    """The real app (lifespan included) over the shared Linker, with some settings groups replaced."""
    s = settings.model_copy(update={"jobs": JobSettings(dir=tmp_path / "jobs"), **groups})
    with TestClient(create_app(s, linker_factory=lambda _: linker), raise_server_exceptions=False) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, c.get("/readyz").text
            time.sleep(0.02)
        yield c


@pytest.fixture()
def keyed(settings, linker, tmp_path: Path) -> Iterator[TestClient]:
    with app_client(settings, linker, tmp_path, auth=AuthSettings(api_keys=KEYS)) as c:
        yield c


def protected_operations(client: TestClient) -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document under /v1/ (jobs included when present), path params filled."""
    ops = []
    for path, methods in client.get("/openapi.json").json()["paths"].items():
        if path.startswith("/v1/"):
            concrete = path.replace("{entity_id}", "Q42").replace("{job_id}", "job-1")
            ops += [(m.upper(), concrete) for m in methods]
    return ops


def test_no_keys_by_default(settings, linker, tmp_path: Path) -> None:
    assert settings.auth.api_keys == []
    with app_client(settings, linker, tmp_path) as c:
        assert c.post("/v1/link", json=LINK).status_code == 200
        assert "securitySchemes" not in c.get("/openapi.json").json().get("components", {})


def test_every_v1_route_needs_a_key(keyed: TestClient) -> None:
    ops = protected_operations(keyed)
    assert {("POST", "/v1/link"), ("POST", "/v1/link/batch"), ("GET", "/v1/entities/Q42"),
            ("POST", "/v1/admin/reload")} <= set(ops)
    for method, path in ops + [("GET", "/v1/no-such-route")]:
        for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": WRONG}, {"Authorization": KEYS[0]},
                        {"Authorization": "Bearer "}, {"X-API-Key": ""}):
            r = keyed.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json() == UNAUTHORIZED
            assert r.headers["www-authenticate"] == "Bearer"


def test_either_header_with_any_key_is_accepted(keyed: TestClient) -> None:
    for headers in ({"Authorization": f"Bearer {KEYS[0]}"}, {"Authorization": f"bearer {KEYS[1]}"},
                    {"X-API-Key": KEYS[1]}, {"Authorization": f"Bearer {KEYS[0]}", "X-API-Key": WRONG}):
        r = keyed.post("/v1/link", json=LINK, headers=headers)
        assert r.status_code == 200, (headers, r.text)
    assert keyed.get("/v1/entities/Q42", headers={"X-API-Key": KEYS[0]}).status_code == 200
    assert keyed.get("/v1/no-such-route", headers={"X-API-Key": KEYS[0]}).status_code == 404


def test_probes_docs_and_metrics_stay_open(keyed: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert keyed.get(path).status_code == 200, path
    schema = keyed.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["paths"]["/v1/link"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_metrics_can_be_protected(settings, linker, tmp_path: Path) -> None:
    with app_client(settings, linker, tmp_path, auth=AuthSettings(api_keys=KEYS, protect_metrics=True)) as c:
        assert c.get("/metrics").json() == UNAUTHORIZED
        r = c.get("/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"})
        assert r.status_code == 200 and "el_auth_failures_total 1.0" in r.text
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_keys_never_reach_logs_or_answers(settings, linker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = settings.model_copy(update={"auth": AuthSettings(api_keys=KEYS)})
    assert not any(k in repr(s) or k in str(s.auth) or k in s.model_dump_json() for k in KEYS)
    with app_client(settings, linker, tmp_path, auth=AuthSettings(api_keys=KEYS)) as c:
        bodies = [c.post("/v1/link", json=LINK, headers={"Authorization": f"Bearer {WRONG}"}).text,
                  c.post("/v1/link", json=LINK, headers={"X-API-Key": KEYS[0]}).text,
                  c.get("/metrics").text]
    assert "refused POST /v1/link: missing or invalid API key" in caplog.text
    for secret in [*KEYS, WRONG]:
        assert secret not in caplog.text
        assert not any(secret in b for b in bodies)


def test_comparison_is_constant_time_over_all_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = auth.ApiKeys(["one", "two", "three"])
    for presented, ok in ((b"one", True), (b"three", True), (b"nope", False), (b"on", False)):
        calls.clear()
        assert keys.check(presented) is ok
        assert len(calls) == 3  # no early exit on a match
        assert {len(a) for a, _ in calls} == {len(b) for _, b in calls} == {32}  # digests: no length leak
    assert not auth.ApiKeys([]) and auth.ApiKeys(["x"]).check(None) is False


def test_keys_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-11\n{KEYS[0]}\n\n  {KEYS[1]}  \n{KEYS[0]}\n")
    monkeypatch.setenv("EL_AUTH__API_KEYS_FILE", str(path))
    monkeypatch.setenv("EL_AUTH__API_KEYS", "k-env-1,k-env-2")
    got = [k.get_secret_value() for k in Settings().auth.api_keys]
    assert got == ["k-env-1", "k-env-2", *KEYS]
    path.write_text("# nothing here\n\n")
    with pytest.raises(ValidationError, match="holds no key"):
        Settings()
    monkeypatch.setenv("EL_AUTH__API_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="unreadable"):
        Settings()


def test_cors_off_by_default(settings, linker, tmp_path: Path) -> None:
    with app_client(settings, linker, tmp_path) as c:
        pre = c.options("/v1/link", headers={"Origin": "https://app.example.org",
                                             "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
        r = c.get("/healthz", headers={"Origin": "https://app.example.org"})
        assert "access-control-allow-origin" not in r.headers


def test_cors_allows_exactly_the_configured_origins(settings, linker, tmp_path: Path) -> None:
    origin = "https://app.example.org"
    with app_client(settings, linker, tmp_path, cors=CorsSettings(allow_origins=[origin]),
                    auth=AuthSettings(api_keys=KEYS)) as c:
        pre = c.options("/v1/link", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200  # a preflight needs no key
        assert pre.headers["access-control-allow-origin"] == origin
        assert "POST" in pre.headers["access-control-allow-methods"]
        other = c.options("/v1/link", headers={"Origin": "https://evil.example.com",
                                               "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        denied = c.post("/v1/link", json=LINK, headers={"Origin": origin})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin
        ok = c.post("/v1/link", json=LINK, headers={"Origin": origin, "X-API-Key": KEYS[0]})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": "https://x.example"}).headers


def test_cors_origins_are_validated() -> None:
    with pytest.raises(ValidationError, match="must look like"):
        CorsSettings(allow_origins=["https://app.example.org/path"])
    assert CorsSettings.model_validate({"allow_origins": "https://a.example, http://localhost:3000"}).allow_origins == [
        "https://a.example", "http://localhost:3000"]
