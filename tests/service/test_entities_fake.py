"""PUT/DELETE /v1/entities/{id}, POST /v1/entities:batch and POST /v1/admin/compact in-process over the fake
backend (tests/fakes.py): request parsing, error codes, the image rules, auth, all-or-nothing batches, and that
a change is seen by the next /v1/link. The real index, log and encoders: tests/service/test_live_updates.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from service.entity_decode import json_list_items
from tests.server_process import metric, scrape
from tests.service.test_api_fake import DOUGLAS, KEY, assert_error, b64, jpeg, png_header, serve

NDJSON = {"content-type": "application/x-ndjson"}


def top_ids(client, mention: str) -> list[str]:
    r = client.post("/v1/link", json={"mention": mention, "top_k": 3})
    assert r.status_code == 200, r.text
    return [e["id"] for e in r.json()["entities"]]


def test_put_creates_then_link_sees_it(tmp_path: Path) -> None:
    with serve(tmp_path) as (client, _linker):
        assert "Q999" not in top_ids(client, "Zorblax Quintavian")
        r = client.put("/v1/entities/Q999", json={"name": "Zorblax Quintavian", "description": "A painter.",
                                                  "start_year": 1901, "end_year": 1980})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body == {"id": "Q999", "op": "put", "index_version": "fake-index@1+1", "entities": 13}
        assert top_ids(client, "Zorblax Quintavian")[0] == "Q999"
        got = client.get("/v1/entities/Q999").json()
        assert got["name"] == "Zorblax Quintavian" and got["description"] == "A painter."
        link = client.post("/v1/link", json={"mention": "Zorblax Quintavian"}).json()
        assert link["index_version"] == body["index_version"]


def test_put_replaces_and_delete_removes(tmp_path: Path) -> None:
    with serve(tmp_path) as (client, _):
        assert client.put("/v1/entities/Q42", json={"name": "Grumbleton Vexmoor"}).status_code == 200
        assert client.get("/v1/entities/Q42").json()["name"] == "Grumbleton Vexmoor"
        assert top_ids(client, "Grumbleton Vexmoor")[0] == "Q42"
        r = client.delete("/v1/entities/Q42")
        assert r.status_code == 200 and r.json()["op"] == "delete" and r.json()["entities"] == 11
        assert "Q42" not in top_ids(client, "Grumbleton Vexmoor")
        assert_error(client.get("/v1/entities/Q42"), 404, "entity_not_found")
        assert_error(client.delete("/v1/entities/Q42"), 404, "entity_not_found")


def test_put_multipart_and_base64_image(tmp_path: Path) -> None:
    with serve(tmp_path) as (client, _linker):
        r = client.put("/v1/entities/Q1", data={"name": "Red Square", "start_year": "1500"},
                       files={"image": ("x.jpg", jpeg(), "image/jpeg")})
        assert r.status_code == 200, r.text
        r = client.put("/v1/entities/Q2", json={"name": "Blue Square", "image": b64(jpeg(color=(0, 0, 200)))})
        assert r.status_code == 200, r.text
        assert client.get("/v1/entities/Q1").json()["has_image"] is True


def test_put_invalid_input(tmp_path: Path) -> None:
    with serve(tmp_path, limits={"max_image_bytes": 4096}) as (client, linker):
        assert_error(client.put("/v1/entities/Q1", json={"description": "no name"}), 422, "invalid_input")
        assert_error(client.put("/v1/entities/Q1", json={"name": "   "}), 422, "invalid_input")
        assert_error(client.put("/v1/entities/Q1", json={"name": "x", "colour": "red"}), 422, "invalid_input")
        assert_error(client.put("/v1/entities/Q1", json={"name": "x", "start_year": 99_999}), 422, "invalid_input")
        assert_error(client.put("/v1/entities/Q1", json={"name": "x" * 2001}), 422, "text_too_long")
        assert_error(client.put("/v1/entities/Q1", content=b"name=x", headers={"content-type": "text/plain"}),
                     415, "unsupported_media_type")
        assert_error(client.put("/v1/entities/Q1", json={"name": "x", "image": "not base64!"}), 422, "invalid_image")
        assert_error(client.put("/v1/entities/Q1", json={"name": "x", "image": b64(b"GIF89a" + b"\0" * 40)}),
                     415, "unsupported_image_format")
        assert_error(client.put("/v1/entities/Q1", json={"name": "x", "image": b64(png_header(50_000, 50_000))}),
                     413, "image_too_large")
        assert_error(client.put("/v1/entities/Q1", json={"name": "x", "image": b64(b"\xff" * 5000)}),
                     413, "image_too_large")
        assert_error(client.put("/v1/entities/a%20b", json={"name": "x"}), 422, "invalid_input")
        assert_error(client.put(f"/v1/entities/{'x' * 257}", json={"name": "x"}), 422, "invalid_input")
        assert linker.store.pending == 0 and linker.encoded == []  # nothing reached the encoder or the index


def test_batch_json_and_jsonl_in_order(tmp_path: Path) -> None:
    with serve(tmp_path, updates={"encode_batch": 2}) as (client, linker):
        items = [{"id": f"N{i}", "name": f"Entity number {i}"} for i in range(5)]
        items += [{"id": "N1", "op": "delete"}, {"id": "Q859", "name": "Plato of Athens"}]
        r = client.post("/v1/entities:batch", json=items)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["applied"] == 7 and body["index_version"] == "fake-index@1+7" and body["entities"] == 16
        assert [x["op"] for x in body["results"]] == ["put"] * 5 + ["delete", "put"]
        assert linker.encoded == [2, 2, 2]  # six puts, encoded in batches of EL_UPDATES__ENCODE_BATCH
        assert_error(client.get("/v1/entities/N1"), 404, "entity_not_found")
        assert client.get("/v1/entities/Q859").json()["name"] == "Plato of Athens"
        samples = scrape(client)
        assert metric(samples, "el_entity_changes_total", op="put") == 6
        assert metric(samples, "el_entity_changes_total", op="delete") == 1
        assert metric(samples, "el_change_log_changes") == 7
        lines = "\n".join(json.dumps(x) for x in [{"id": "J1", "name": "Jay One"}, {"id": "N0", "op": "delete"}])
        r = client.post("/v1/entities:batch", content=lines + "\n", headers=NDJSON)
        assert r.status_code == 200 and r.json()["applied"] == 2, r.text
        assert top_ids(client, "Jay One")[0] == "J1"


def test_batch_is_all_or_nothing(tmp_path: Path) -> None:
    with serve(tmp_path, updates={"max_batch_items": 3}) as (client, linker):
        before = client.get("/readyz").status_code, linker.index.version
        bad = [{"id": "A1", "name": "Alpha"}, {"id": "NOPE", "op": "delete"}]
        assert_error(client.post("/v1/entities:batch", json=bad), 404, "entity_not_found")
        assert_error(client.post("/v1/entities:batch", json=[{"id": "A1"}]), 422, "invalid_input")
        assert_error(client.post("/v1/entities:batch", json=[{"id": "A1", "name": "x", "op": "move"}]),
                     422, "invalid_input")
        assert_error(client.post("/v1/entities:batch", json=[{"id": f"A{i}", "name": "x"} for i in range(4)]),
                     422, "too_many_items")
        assert_error(client.post("/v1/entities:batch", json={"id": "A1", "name": "x"}), 422, "invalid_input")
        assert_error(client.post("/v1/entities:batch", json=[]), 422, "invalid_input")
        assert_error(client.post("/v1/entities:batch", content=b'{"id": "A1"\n', headers=NDJSON), 422, "invalid_input")
        assert_error(client.post("/v1/entities:batch", content=b"[]", headers={"content-type": "text/csv"}),
                     415, "unsupported_media_type")
        assert (client.get("/readyz").status_code, linker.index.version) == before
        assert_error(client.get("/v1/entities/A1"), 404, "entity_not_found")


def test_a_bad_image_after_encoded_items_applies_nothing(tmp_path: Path) -> None:
    """Items are encoded while later ones are still being decoded: a bad image at the end still fails the whole
    request, after earlier items were encoded, and nothing of it is applied or logged."""
    with serve(tmp_path, updates={"encode_batch": 1}) as (client, linker):
        before = linker.index.version
        items = [{"id": f"A{i}", "name": f"Alpha {i}", "image": b64(jpeg())} for i in range(3)]
        items.append({"id": "A3", "name": "Alpha 3", "image": b64(jpeg()[:40])})  # truncated JPEG
        assert_error(client.post("/v1/entities:batch", json=items), 422, "invalid_image")
        assert linker.index.version == before
        for i in range(4):
            assert_error(client.get(f"/v1/entities/A{i}"), 404, "entity_not_found")
        ok = client.post("/v1/entities:batch", json=items[:3])  # the updater is still working
        assert ok.status_code == 200, ok.text
        assert client.get("/v1/entities/A2").status_code == 200


def test_changes_need_the_api_key(tmp_path: Path) -> None:
    with serve(tmp_path, auth={"api_keys": [KEY]}) as (client, linker):
        assert_error(client.put("/v1/entities/Q1", json={"name": "x"}), 401, "unauthorized")
        assert_error(client.delete("/v1/entities/Q42"), 401, "unauthorized")
        assert_error(client.post("/v1/entities:batch", json=[{"id": "Q1", "name": "x"}]), 401, "unauthorized")
        assert_error(client.post("/v1/admin/compact"), 401, "unauthorized")
        assert linker.store.pending == 0
        ok = client.put("/v1/entities/Q1", json={"name": "x"}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text


def test_updates_disabled(tmp_path: Path) -> None:
    with serve(tmp_path, updates={"enabled": False}) as (client, _linker):
        assert_error(client.put("/v1/entities/Q1", json={"name": "x"}), 409, "updates_disabled")
        assert_error(client.delete("/v1/entities/Q42"), 409, "updates_disabled")
        assert client.post("/v1/link", json=DOUGLAS).status_code == 200


def test_compact_route(tmp_path: Path) -> None:
    with serve(tmp_path) as (client, linker):
        client.put("/v1/entities/Q1", json={"name": "x"})
        r = client.post("/v1/admin/compact?wait=true")
        assert r.status_code == 200, r.text
        assert r.json() == {"state": "done", "index_version": "fake-index@c1", "changes": 1}
        assert linker.store.compactions == 1
        assert client.get("/v1/entities/Q1").json()["name"] == "x"
        samples = scrape(client)
        assert metric(samples, "el_index_compactions_total", outcome="ok") == 1
        assert metric(samples, "el_change_log_changes") == 0


def test_auto_compaction_threshold(tmp_path: Path) -> None:
    with serve(tmp_path, updates={"compact_after": 3}) as (client, linker):
        client.post("/v1/entities:batch", json=[{"id": f"C{i}", "name": f"c {i}"} for i in range(2)])
        assert linker.store.compactions == 0
        client.put("/v1/entities/C9", json={"name": "c 9"})
        client.app.state.el.updater.wait_compaction(10)
        assert linker.store.compactions == 1 and linker.store.pending == 0


def test_body_cap_of_the_batch_route(tmp_path: Path) -> None:
    with serve(tmp_path, updates={"max_body_bytes": 2048}) as (client, _):
        big = [{"id": f"B{i}", "name": "x" * 100} for i in range(40)]
        assert_error(client.post("/v1/entities:batch", json=big), 413, "payload_too_large")


def test_update_threads_run_at_lower_priority() -> None:
    """EL_UPDATES__NICE: the update worker and the decoding thread get a higher nice value than the server's
    threads (Linux schedules threads alone), so /v1/link gets the cores first under contention."""
    import os
    import threading

    from service.updates import EntityUpdater

    def nice_here() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    updater = EntityUpdater(lambda: None, encode_batch=8, max_pending=8, compact_after=0, enabled=True, nice=5)
    try:
        base = nice_here()
        assert updater._pool.submit(nice_here).result() == min(base + 5, 19)
        assert updater._decoder.submit(nice_here).result() == min(base + 5, 19)
        assert nice_here() == base  # the caller's own thread is untouched
    finally:
        updater.close()


@pytest.mark.parametrize("text", ["[]", " [ ] ", '[1, {"a": [1,2]}, "x"]', '[ "a" ,\n"b" ]', "[[]]", '[NaN]', "[1,]",
                                  "[1 2]", "[1", "[", '{"a":1}', "3", "", "[1] x", "[,1]", "nul"])
def test_the_item_by_item_list_parser_agrees_with_json_loads(text: str) -> None:
    try:
        want = json.loads(text)
        want = want if isinstance(want, list) else None
    except ValueError:
        with pytest.raises(ValueError):
            json_list_items(text)
        return
    got = json_list_items(text)
    assert got == want or (got is not None and want is not None and str(got) == str(want))  # NaN != NaN


def test_the_update_worker_encodes_what_is_decoded_in_calls_of_eight_to_encode_batch() -> None:
    """Decoded items go to the encoder in one call up to EL_UPDATES__ENCODE_BATCH (the encoder pads less in
    larger calls); a call starts early, from ENCODE_LEAST items, when the next item is not decoded yet."""
    from concurrent.futures import Future

    from kg_index.load import EntityMeta
    from service.settings import Settings
    from service.updates import ENCODE_LEAST, EntityUpdater, PendingChange
    from tests.fakes import FakeLinker

    linker = FakeLinker(Settings())
    updater = EntityUpdater(lambda: linker, encode_batch=64, max_pending=1000, compact_after=0, enabled=True)

    def decoded(i: int) -> Future:
        f: Future = Future()
        f.set_result(PendingChange(f"E{i}", EntityMeta(f"E{i}", f"Entity {i}", "", False)))
        return f

    try:
        updater._run([decoded(i) for i in range(150)])  # all decoded: full calls
        assert linker.encoded == [64, 64, 22]
        linker.encoded.clear()
        late: Future = Future()  # item 12 is decoded only once the first call has started
        futures = [decoded(i) for i in range(12)] + [late] + [decoded(i) for i in range(13, 20)]
        encode = linker.encode_entities

        def encode_then_decode(metas: list, images: list) -> list:
            if not late.done():
                late.set_result(decoded(12).result())
            return encode(metas, images)

        linker.encode_entities = encode_then_decode  # type: ignore[method-assign]
        updater._run(futures)
        assert linker.encoded == [12, 8] and ENCODE_LEAST == 8
        linker.encoded.clear()
        few: Future = Future()
        threading.Timer(0.2, lambda: few.set_result(decoded(3).result())).start()
        updater._run([decoded(0), decoded(1), decoded(2), few])  # fewer than ENCODE_LEAST ready: it waits
        assert linker.encoded == [4]
    finally:
        updater.close()


def test_batches_are_decoded_in_a_child_process_replaced_when_it_dies(tmp_path: Path) -> None:
    """A batch's JSON parsing, base64 and image decoding run in a child process (the server's GIL stays free for
    /v1/link), and its decode counts reach the server's metrics. Killed, it is replaced: the request that finds it
    dead is decoded in the server from the same spooled body, the next one in a new child."""
    import os
    import signal

    from tests.service.test_api_fake import eventually

    with serve(tmp_path) as (client, _):
        decoding = client.app.state.el.entity_decoding  # type: ignore[attr-defined]
        decoding.min_bytes = 0  # these test photos are tiny: every body goes to the child

        def put(tag: str) -> None:
            items = [{"id": f"{tag}{i}", "name": f"Photo {tag} {i}", "image": b64(jpeg())} for i in range(3)]
            before = metric(scrape(client), "el_image_decodes_total")
            r = client.post("/v1/entities:batch", json=items)
            assert r.status_code == 200, r.text
            assert client.get(f"/v1/entities/{tag}2").json()["has_image"] is True
            assert metric(scrape(client), "el_image_decodes_total") == before + 3

        put("P")
        before = metric(scrape(client), "el_image_decodes_total")  # a refused image's decode is counted too
        bad = [{"id": "B0", "name": "Bad", "image": b64(jpeg()[:-20])}]  # header fine, pixel data cut short
        assert_error(client.post("/v1/entities:batch", json=bad), 422, "invalid_image")
        assert metric(scrape(client), "el_image_decodes_total") == before + 1
        (child,) = list(decoding._pool._processes.values())
        assert child.pid != os.getpid()
        os.kill(child.pid, signal.SIGKILL)
        eventually(lambda: not child.is_alive(), "the child to die")
        put("Q")  # finds it dead: decoded here
        put("R")  # a new child
        (again,) = list(decoding._pool._processes.values())
        assert again.pid not in (child.pid, os.getpid()) and again.is_alive()


@pytest.mark.parametrize("off", [{"decode_process": False}, {}])  # switched off, or a body too small to send
def test_batches_decode_in_the_server_when_the_child_process_is_off(tmp_path: Path, off: dict) -> None:
    with serve(tmp_path, updates=off) as (client, _):
        items = [{"id": "S1", "name": "Solo", "image": b64(jpeg())}, {"id": "S2", "name": "Duo"}]
        r = client.post("/v1/entities:batch", json=items)
        assert r.status_code == 200 and r.json()["applied"] == 2, r.text
        assert_error(client.post("/v1/entities:batch", json=[{"id": "S3", "name": "x", "image": "!!"}]), 422,
                     "invalid_image")
        assert client.app.state.el.entity_decoding._pool is None  # type: ignore[attr-defined]


def test_the_decoding_process_and_the_server_decode_alike_and_a_stopped_one_starts_no_child(tmp_path: Path) -> None:
    import asyncio

    from service.decode_process import DecodeProcess
    from service.settings import Settings

    body = tmp_path / "batch.json"
    body.write_text(json.dumps([{"id": "A1", "name": " Alpha ", "image": b64(jpeg())}, {"id": "B2", "op": "delete"}]))
    decoding = DecodeProcess(Settings(), min_bytes=0)
    try:
        in_child = asyncio.run(decoding.open(body, "application/json"))
        assert decoding._pool is not None and in_child.ops == [("A1", "put"), ("B2", "delete")]
        child = [d() for d in in_child.decoders]
        in_child.close()
    finally:
        decoding.close()
    here = asyncio.run(decoding.open(body, "application/json"))  # stopped: decoded in this process
    assert decoding._pool is None and here.ops == in_child.ops
    server = [d() for d in here.decoders]
    assert [(c.id, c.name, c.op) for c in child] == [(c.id, c.name, c.op) for c in server] == [
        ("A1", "Alpha", "put"), ("B2", None, "delete")]
    assert child[0].image is not None and child[0].image.tobytes() == server[0].image.tobytes()
