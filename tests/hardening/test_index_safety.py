"""Index safety over real HTTP (reliability F5, H5): a corrupted index is refused at start-up with a message
naming the file; POST /v1/admin/reload and SIGHUP swap to a verified index atomically, a bad folder changes
nothing, and under load every answer comes wholly from the old or wholly from the new index."""

from __future__ import annotations

import itertools
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import JobSettings
from tests.hardening.server import Server, index_ids, index_version, launch, metric, running, wait

pytestmark = [pytest.mark.slow, pytest.mark.onnx]

MENTIONS = ["Douglas Adams", "Abraham Lincoln", "Berlin", "Plato", "Paris", "the Beatles", "Einstein", "Python"]


@pytest.fixture(scope="module")
def live_dir(small_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's configured EL_INDEX__DIR: a copy of small_index that the SIGHUP test may replace."""
    out = tmp_path_factory.mktemp("live") / "index"
    shutil.copytree(small_index, out)
    return out


@pytest.fixture(scope="module")
def server(settings, live_dir: Path) -> Server:
    with running(settings, EL_INDEX__DIR=live_dir) as s:
        yield s


def reload(c: httpx.Client, index_dir: Path | None = None) -> httpx.Response:
    return c.post("/v1/admin/reload", json={} if index_dir is None else {"index_dir": str(index_dir)})


def serving(c: httpx.Client) -> str:
    r = c.get("/readyz")
    assert r.status_code == 200, r.text
    return r.json()["index_version"]


def test_f5_corrupted_index_is_refused_at_start_naming_the_file(settings, corrupt_index: Path) -> None:
    s = wait(launch(settings, EL_INDEX__DIR=corrupt_index), ready=False)
    try:
        with s.client() as c:
            assert c.get("/healthz").status_code == 200
            r = c.get("/readyz")
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "failed"
            assert f"{corrupt_index / 'text_local.npy'}: checksum mismatch" in body["detail"]
            link = c.post("/v1/link", json={"mention": "Douglas Adams"})
            assert link.status_code == 503
            assert link.json() == {"error": {"code": "not_ready", "message": "model or index failed to load"}}
            assert str(corrupt_index) not in link.text  # server paths go to /readyz and the log only
        assert f"{corrupt_index / 'text_local.npy'}: checksum mismatch" in s.log()
    finally:
        s.stop()


def test_reload_swaps_and_a_bad_folder_changes_nothing(server: Server, live_dir: Path, other_index: Path,
                                                       corrupt_index: Path, tmp_path: Path) -> None:
    va, vb = index_version(live_dir), index_version(other_index)
    assert va != vb
    with server.client() as c:
        before = server.metrics()
        assert serving(c) == va
        r = reload(c, other_index)
        assert r.status_code == 200, r.text
        assert r.json() == {"index_version": vb, "previous_version": va, "index_dir": str(other_index),
                            "entities": len(index_ids(other_index))}
        assert serving(c) == vb
        linked = c.post("/v1/link", json={"mention": "Douglas Adams"}).json()
        assert linked["index_version"] == vb and {e["id"] for e in linked["entities"]} <= index_ids(other_index)

        bad = reload(c, corrupt_index)
        assert bad.status_code == 422
        err = bad.json()["error"]
        assert err["code"] == "invalid_index"
        assert err["message"] == (f"index refused, still serving {vb}: {corrupt_index / 'text_local.npy'}: "
                                  "checksum mismatch (corrupted or modified)")
        missing = reload(c, tmp_path / "nowhere")
        assert missing.status_code == 422 and "manifest.json: no manifest" in missing.json()["error"]["message"]
        assert reload(c, tmp_path).status_code == 422  # a folder, but not an index
        assert c.post("/v1/admin/reload", json={"index_dir": ""}).status_code == 422
        assert c.post("/v1/admin/reload", json={"index_dir": "a\u0000b"}).status_code == 422
        assert c.post("/v1/admin/reload", json={"other": 1}).status_code == 422
        assert serving(c) == vb  # nothing changed

        back = c.post("/v1/admin/reload")  # no body: the configured EL_INDEX__DIR
        assert back.status_code == 200 and back.json()["index_version"] == va
        assert back.json()["index_dir"] == str(live_dir)
        assert serving(c) == va
        after = server.metrics()
    assert metric(after, "el_index_reloads_total", outcome="ok") - metric(before, "el_index_reloads_total",
                                                                          outcome="ok") == 2
    assert metric(after, "el_index_reloads_total", outcome="refused") - metric(
        before, "el_index_reloads_total", outcome="refused") == 3


def test_h5_swap_under_load_answers_wholly_from_one_index(server: Server, live_dir: Path, other_index: Path) -> None:
    ids = {index_version(live_dir): index_ids(live_dir), index_version(other_index): index_ids(other_index)}
    stop = threading.Event()
    answers: list[dict] = []
    failures: list[str] = []

    def client_loop(seed: int) -> None:
        names = itertools.cycle(MENTIONS[seed:] + MENTIONS[:seed])
        with server.client() as c:
            while not stop.is_set():
                if seed % 2:
                    r = c.post("/v1/link/batch", json={"items": [{"mention": next(names), "top_k": 5} for _ in range(3)]})
                else:
                    r = c.post("/v1/link", json={"mention": next(names), "top_k": 5})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                body = r.json()
                answers.extend(body.get("results", [body]))
                if "results" in body and {x["index_version"] for x in body["results"]} != {body["index_version"]}:
                    failures.append(f"one batch answered from two indexes: {body}")

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    swaps = 0
    try:
        with server.client() as c:
            deadline = time.monotonic() + 4.0
            for target in itertools.cycle([other_index, live_dir]):
                if time.monotonic() > deadline:
                    break
                r = reload(c, target)
                assert r.status_code == 200, r.text
                swaps += 1
                time.sleep(0.1)
            if swaps % 2:  # leave the configured index in place for the next test
                assert reload(c, live_dir).status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert swaps >= 6
    seen = {a["index_version"] for a in answers}
    assert seen == set(ids), seen  # both indexes answered
    for a in answers:
        assert a["index_version"] in ids
        got = {e["id"] for e in a["entities"]}
        assert got and got <= ids[a["index_version"]], (a["index_version"], got - ids[a["index_version"]])


def test_sighup_reloads_the_configured_folder(server: Server, live_dir: Path, other_index: Path,
                                             corrupt_index: Path) -> None:
    va, vb = index_version(live_dir), index_version(other_index)
    parked = live_dir.with_name("parked")
    with server.client() as c:
        assert serving(c) == va
        # A corrupted configured folder: SIGHUP is refused and the old index keeps serving.
        live_dir.rename(parked)
        shutil.copytree(corrupt_index, live_dir)
        server.signal(signal.SIGHUP)
        wait_for_log(server, "SIGHUP reload failed")
        assert serving(c) == va
        # The operator puts a good index in place and sends SIGHUP again.
        shutil.rmtree(live_dir)
        shutil.copytree(other_index, live_dir)
        server.signal(signal.SIGHUP)
        wait_for_log(server, f"SIGHUP: now serving index {vb}")
        assert serving(c) == vb
        assert c.post("/v1/link", json={"mention": "Berlin"}).json()["index_version"] == vb
        # Back to the first index for whatever runs next.
        shutil.rmtree(live_dir)
        parked.rename(live_dir)
        assert reload(c).json()["index_version"] == va
    assert "text_local.npy: checksum mismatch" in server.log()


def wait_for_log(server: Server, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log()[-3000:]}"
        time.sleep(0.05)


def test_concurrent_reload_is_refused(settings, linker, tmp_path: Path) -> None:
    s = settings.model_copy(update={"jobs": JobSettings(dir=tmp_path / "jobs")})
    app = create_app(s, linker_factory=lambda _: linker)
    with TestClient(app) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.02)
        app.state.el.reloading = True  # as if another reload were verifying a large index right now
        r = c.post("/v1/admin/reload")
        assert r.status_code == 409
        assert r.json() == {"error": {"code": "conflict", "message": "an index reload is already running"}}


# ------------------------------------------------------------------ an index built from another KG (issue 20)


@pytest.fixture(scope="module")
def jsonl_index(runtime, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-entity index over a user's JSONL KG, with its source recorded as `el build-index` records it."""
    from kg_index.build import build_index
    from kg_index.readers import read_jsonl_kg
    from kg_index.source import kg_source

    folder = tmp_path_factory.mktemp("own-kg")
    kg = folder / "my_kg.jsonl"
    kg.write_text('{"id": "X1", "name": "Zorvathine Quellmarch", "description": "glass sculptor"}\n'
                  '{"id": "X2", "name": "Ombrelt Tessavine", "description": "lighthouse keeper"}\n'
                  '{"id": "X3", "name": "Pellory Vance", "description": "river pilot"}\n')
    out = folder / "index"
    build_index(read_jsonl_kg(kg), runtime, out, kg=str(kg), progress=False, source=kg_source(str(kg), folder))
    return out


def _own_kg_settings(settings, index_dir: Path, tmp_path: Path, **index: object):
    """The test settings (EL_INDEX__KG=mel over the benchmark folder) serving index_dir."""
    return settings.model_copy(update={"jobs": JobSettings(dir=tmp_path / "jobs"),
                                       "index": settings.index.model_copy(update={"dir": index_dir, **index})})


def _readyz_after_loading(c: TestClient) -> httpx.Response:
    deadline = time.monotonic() + 120
    while (r := c.get("/readyz")).status_code == 503 and r.json()["status"] == "loading":
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    return r


def test_index_from_another_kg_is_refused_at_start_naming_both(settings, jsonl_index: Path, mel_dir: Path,
                                                               tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kg_index.manifest import Manifest

    version = Manifest.read(jsonl_index).version
    kg = jsonl_index.parent / "my_kg.jsonl"
    with TestClient(create_app(_own_kg_settings(settings, jsonl_index, tmp_path))) as c:
        r = _readyz_after_loading(c)
        assert r.status_code == 503 and r.json()["status"] == "failed"
        detail = r.json()["detail"]
        assert detail.startswith(f"start-up failed: {jsonl_index / 'manifest.json'}: index {version} (3 entities) "
                                 f"was built from {kg} (fingerprint ")
        assert f"but the configured KG is the MEL KBs under {mel_dir} (fingerprint " in detail
        assert detail.endswith("a jsonl KG, not a mel one; rebuild it (make index, or el build-index --if-missing) "
                               "or set EL_INDEX__ALLOW_SOURCE_MISMATCH=true to serve it anyway")
        assert c.post("/v1/link", json={"mention": "Zorvathine"}).status_code == 503
    logged = [rec for rec in caplog.records if rec.name == "service.app" and rec.levelname == "ERROR"]
    assert [rec.getMessage() for rec in logged] == [detail]
    assert logged[0].exc_info is None  # a message, not a traceback


def test_index_from_another_kg_served_on_purpose_says_so_in_readyz(settings, jsonl_index: Path, mel_dir: Path,
                                                                    tmp_path: Path) -> None:
    s = _own_kg_settings(settings, jsonl_index, tmp_path, allow_source_mismatch=True)
    with TestClient(create_app(s)) as c:
        r = _readyz_after_loading(c)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ready"
        assert body["detail"].startswith(f"serving index {body['index_version']} (3 entities) built from "
                                         f"{jsonl_index.parent / 'my_kg.jsonl'}")
        assert str(mel_dir) in body["detail"] and body["detail"].endswith("(EL_INDEX__ALLOW_SOURCE_MISMATCH)")
        linked = c.post("/v1/link", json={"mention": "Zorvathine Quellmarch"})
        assert linked.status_code == 200 and linked.json()["entities"][0]["id"] == "X1"


def test_reload_to_an_index_from_another_kg_is_refused(settings, linker, jsonl_index: Path, tmp_path: Path) -> None:
    app = create_app(settings.model_copy(update={"jobs": JobSettings(dir=tmp_path / "jobs")}),
                     linker_factory=lambda _: linker)
    with TestClient(app) as c:
        before = _readyz_after_loading(c).json()
        assert before["status"] == "ready" and before["detail"] is None
        r = c.post("/v1/admin/reload", json={"index_dir": str(jsonl_index)})
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["code"] == "invalid_index"
        assert err["message"].startswith(f"index refused, still serving {before['index_version']}: "
                                         f"{jsonl_index / 'manifest.json'}: index ")
        assert "was built from" in err["message"] and "but the configured KG is the MEL KBs under" in err["message"]
        assert c.get("/readyz").json() == before  # still serving the old index
