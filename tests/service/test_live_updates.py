"""Changing the KG while serving, end to end: a real server (`python -m service serve`), the real encoders, a real
index folder (a private copy of the session's small index: the server writes its change log and compacts there),
real HTTP. Add an entity and link to it; rename one and see the new name win; delete one and never see it again;
1,000 changes interleaved with links from several threads with no error and no torn read; SIGKILL right after an
acknowledged change, restart, the change is there; compaction while links and changes run drops nothing."""

from __future__ import annotations

import base64
import json
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kg_index.manifest import Manifest
from tests.server_process import Server, launch, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def index_copy(small_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("live") / "index"
    shutil.copytree(small_index, out)
    return out


@pytest.fixture(scope="module")
def server(settings, index_copy: Path) -> Iterator[Server]:
    s = wait_until(launch(settings, {"EL_INDEX__DIR": str(index_copy), "EL_UPDATES__ENABLED": "true",
                                     "EL_UPDATES__COMPACT_AFTER": "0"}))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=120.0) as c:
        yield c


def link(client: httpx.Client, mention: str, context: str = "", top_k: int = 10, image: bytes | None = None) -> dict:
    body: dict = {"mention": mention, "context": context, "top_k": top_k}
    if image is not None:
        body["image"] = base64.b64encode(image).decode()
    r = client.post("/v1/link", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_add_an_entity_and_link_to_it(client: httpx.Client, settings) -> None:
    photo = (Path(settings.data_dir) / "RichpediaMEL" / "images" / "Q42.jpg").read_bytes()
    mention, context = "Zorblax Quintavian", "Zorblax Quintavian, the Venusian painter, in his studio in 1931."
    assert all(e["id"] != "live:zorblax" for e in link(client, mention, context)["entities"])
    r = client.put("/v1/entities/live:zorblax", json={
        "name": "Zorblax Quintavian", "description": "Occupation: painter. Birth: 1890. Citizenship: Venus.",
        "image": base64.b64encode(photo).decode()})
    assert r.status_code == 200, r.text
    version = r.json()["index_version"]
    got = link(client, mention, context)
    assert got["index_version"] == version
    top = got["entities"][0]
    assert top["id"] == "live:zorblax" and top["name"] == "Zorblax Quintavian"
    assert top["rerank_score"] not in (None, 0.0)  # reranked with its own local features (OT over its tokens)
    assert top["name_tokens_score"] == 1.0  # and the name terms see it
    with_image = link(client, mention, context, image=photo)["entities"][0]
    assert with_image["id"] == "live:zorblax" and with_image["rerank_score"] != top["rerank_score"]
    assert client.get("/v1/entities/live:zorblax").json()["has_image"] is True


def test_a_photo_batch_is_decoded_in_a_child_process(server: Server, client: httpx.Client, settings) -> None:
    """A batch of real photos (a body over a megabyte) is parsed and decoded by the server's child process
    (service/decode_process.py): the entities come out with their images' features, linked with them, and the
    child is a process of the server's."""
    photos = sorted((Path(settings.data_dir) / "WikiMEL" / "images").glob("*.jpg"), key=lambda p: -p.stat().st_size)[:3]
    names = ["Quilmarsh Vendrake", "Brisolette Carnwick", "Thaddeus Ormsplinter"]
    items = [{"id": f"live:photo{i}", "name": names[i], "description": "A photograph.",
              "image": base64.b64encode(p.read_bytes()).decode()} for i, p in enumerate(photos)]
    assert len(json.dumps(items)) >= 1 << 20
    r = client.post("/v1/entities:batch", json=items)
    assert r.status_code == 200, r.text
    assert [x["id"] for x in r.json()["results"]] == [i["id"] for i in items]
    for i, p in enumerate(photos):
        assert client.get(f"/v1/entities/live:photo{i}").json()["has_image"] is True
        top = link(client, names[i], image=p.read_bytes())["entities"][0]
        assert top["id"] == f"live:photo{i}"
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server.proc.pid and b"spawn_main" in cmdline:
            children.append(int(stat.parent.name))
    assert children, "no decoding process under the server"


def _linked_gold(client: httpx.Client, test_mentions, skip: set[str]) -> tuple[object, dict]:
    """A test mention the server links to its gold entity, and that entity's answer."""
    for m in test_mentions:
        if m.answer in skip:
            continue
        got = link(client, m.mention, m.context)["entities"]
        if got and got[0]["id"] == m.answer:
            return m, got[0]
    pytest.fail("no test mention linked to its gold entity")


def test_rename_and_the_new_name_wins(client: httpx.Client, test_mentions) -> None:
    m, old = _linked_gold(client, test_mentions, set())
    entity = client.get(f"/v1/entities/{m.answer}").json()
    r = client.put(f"/v1/entities/{m.answer}", json={"name": "Quorvath Blenkinsop", "description": entity["description"]})
    assert r.status_code == 200, r.text
    got = link(client, "Quorvath Blenkinsop", "Quorvath Blenkinsop at the opening", top_k=3)
    assert got["entities"][0]["id"] == m.answer and got["entities"][0]["name"] == "Quorvath Blenkinsop"
    for e in link(client, m.mention, m.context, top_k=100)["entities"]:  # only ever in its new form
        if e["id"] == m.answer:
            assert e["name"] == "Quorvath Blenkinsop"
        assert e["name"] != old["name"] or e["id"] != m.answer


def test_delete_and_never_see_it_again(client: httpx.Client, test_mentions) -> None:
    m, _ = _linked_gold(client, test_mentions, {"Q1"})
    r = client.delete(f"/v1/entities/{m.answer}")
    assert r.status_code == 200, r.text
    for mention, context in ((m.mention, m.context), (m.mention, ""), (m.context[:200] or m.mention, "")):
        assert all(e["id"] != m.answer for e in link(client, mention, context, top_k=100)["entities"])
    assert client.get(f"/v1/entities/{m.answer}").status_code == 404
    assert client.delete(f"/v1/entities/{m.answer}").status_code == 404


def test_a_thousand_changes_under_links_no_error_no_torn_read(server: Server, client: httpx.Client) -> None:
    """20 "hot" entities renamed over and over (plus new ones added and some deleted) in 50 batches of 20 while 3
    threads link their names. Every answer must match the state the updater acknowledged for the answer's
    version: a hot entity appears only under the name it had in that version, never after its deletion."""
    rng = random.Random(0)
    hot = [f"hot:{k}" for k in range(20)]
    setup = client.post("/v1/entities:batch", json=[{"id": h, "name": f"Hotname{k} Rev0"} for k, h in enumerate(hot)])
    assert setup.status_code == 200, setup.text
    state = {h: f"Hotname{k} Rev0" for k, h in enumerate(hot)}
    state_at: dict[str, dict[str, str | None]] = {setup.json()["index_version"]: dict(state)}
    done = threading.Event()
    errors: list[str] = []
    answers: list[dict] = []
    lock = threading.Lock()

    def linker(seed: int) -> None:
        r = random.Random(seed)
        with server.client(timeout=120.0) as c:
            while not done.is_set():
                k = r.randrange(20)
                resp = c.post("/v1/link", json={"mention": f"Hotname{k}", "top_k": 5})
                with lock:
                    if resp.status_code != 200:
                        errors.append(f"link {resp.status_code}: {resp.text[:200]}")
                    else:
                        answers.append(resp.json())

    threads = [threading.Thread(target=linker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    sent = 0
    try:
        for call in range(50):
            items = []
            for j in range(20):
                h = rng.choice(hot)
                if state[h] is None or rng.random() < 0.7:
                    name = f"Hotname{hot.index(h)} Rev{call * 20 + j + 1}"
                    items.append({"id": h, "name": name, "description": f"revision {call * 20 + j + 1}"})
                    state[h] = name
                elif rng.random() < 0.5:
                    items.append({"id": h, "op": "delete"})
                    state[h] = None
                else:
                    items.append({"id": f"new:{call}:{j}", "name": f"Newcomer {call} {j}"})
            resp = client.post("/v1/entities:batch", json=items)
            assert resp.status_code == 200, resp.text
            state_at[resp.json()["index_version"]] = dict(state)
            sent += len(items)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert sent == 1000 and not errors, errors[:5]
    assert len(answers) >= 30
    seen_versions = set()
    for a in answers:
        v = a["index_version"]
        assert v in state_at, f"an answer from version {v}, which no acknowledged change produced"
        seen_versions.add(v)
        want = state_at[v]
        for e in a["entities"]:
            if e["id"] in want:
                assert want[e["id"]] is not None, f"{e['id']} answered in {v}, where it was deleted"
                assert e["name"] == want[e["id"]], f"torn read in {v}: {e['id']} as {e['name']!r}, not {want[e['id']]!r}"
    assert len(seen_versions) > 3  # the links really ran across many versions


def test_compaction_under_load_drops_nothing(server: Server, client: httpx.Client, index_copy: Path) -> None:
    before = client.get("/readyz").json()
    version0 = link(client, "Hotname3")["index_version"]
    assert "+" in version0  # changes are pending in the log
    done = threading.Event()
    codes: list[int] = []
    acked: list[str] = []
    lock = threading.Lock()

    def linker() -> None:
        with server.client(timeout=120.0) as c:
            while not done.is_set():
                r = c.post("/v1/link", json={"mention": "Zorblax Quintavian", "top_k": 3})
                with lock:
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        assert r.json()["entities"][0]["id"] == "live:zorblax"

    def updater() -> None:
        with server.client(timeout=120.0) as c:
            i = 0
            while not done.is_set():
                r = c.put(f"/v1/entities/during:{i}", json={"name": f"During Compaction {i}"})
                with lock:
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        acked.append(f"during:{i}")
                i += 1

    threads = [threading.Thread(target=linker) for _ in range(2)] + [threading.Thread(target=updater)]
    for t in threads:
        t.start()
    try:
        r = client.post("/v1/admin/compact", params={"wait": "true"})
    finally:
        done.set()
        for t in threads:
            t.join()
    assert r.status_code == 200, r.text
    assert codes and set(codes) == {200}, sorted(set(codes))
    new_version = r.json()["index_version"]
    m = Manifest.read(index_copy)
    assert new_version.split("+")[0] == m.version != version0.split("+")[0]
    assert m.compacted is not None and m.compacted["changes"] > 1000
    # Every change acknowledged during the compaction is served (those after its snapshot were carried over)
    assert acked and all(client.get(f"/v1/entities/{i}").status_code == 200 for i in acked)
    assert link(client, "Zorblax Quintavian", top_k=1)["entities"][0]["id"] == "live:zorblax"
    assert before["status"] == client.get("/readyz").json()["status"]


def test_a_replaced_entity_never_gets_its_kg_image_back(client: httpx.Client, index_copy: Path, settings) -> None:
    """The KG file's image belongs to the entity as the file describes it: once the entity is put through the API,
    GET /v1/entities/{id}/image answers 404, before and after a compaction folds the change into the folder."""
    with_image = []
    for line in (index_copy / "entities.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["has_image"] and not row.get("changed") and client.get(f"/v1/entities/{row['id']}/image").status_code == 200:
            with_image.append(row)
        if len(with_image) == 2:
            break
    assert len(with_image) == 2, "the small index has no two entities with a servable KG image"
    replaced, untouched = with_image
    photo = (Path(settings.data_dir) / "RichpediaMEL" / "images" / "Q42.jpg").read_bytes()
    r = client.put(f"/v1/entities/{replaced['id']}", json={"name": replaced["name"], "description": "new photo",
                                                          "image": base64.b64encode(photo).decode()})
    assert r.status_code == 200, r.text
    for stage in ("in the change log", "compacted"):
        if stage == "compacted":
            r = client.post("/v1/admin/compact", params={"wait": "true"})
            assert r.status_code == 200, r.text
            assert "+" not in r.json()["index_version"]
        r = client.get(f"/v1/entities/{replaced['id']}/image")
        assert r.status_code == 404 and r.json()["error"]["code"] == "entity_image_not_found", (stage, r.text)
        assert client.get(f"/v1/entities/{replaced['id']}").json()["has_image"] is True
        assert client.get(f"/v1/entities/{untouched['id']}/image").headers["content-type"] == "image/jpeg"


def test_sigkill_after_an_acknowledged_change_loses_nothing(settings, small_index: Path, tmp_path: Path) -> None:
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    env = {"EL_INDEX__DIR": str(folder), "EL_UPDATES__ENABLED": "true"}
    first = wait_until(launch(settings, env))
    try:
        with first.client(timeout=120.0) as c:
            victim = c.post("/v1/link", json={"mention": "Paris", "top_k": 1}).json()["entities"][0]["id"]
            assert c.delete(f"/v1/entities/{victim}").status_code == 200
            r = c.put("/v1/entities/live:kill", json={"name": "Xanthippe Moonbottle", "description": "A test."})
            assert r.status_code == 200, r.text
            acked = r.json()["index_version"]
        first.proc.kill()  # SIGKILL: no drain, no clean-up; right after the answer
        first.proc.wait(10)
    finally:
        first.stop()
    second = wait_until(launch(settings, env))
    try:
        with second.client(timeout=120.0) as c:
            got = c.post("/v1/link", json={"mention": "Xanthippe Moonbottle", "top_k": 100}).json()
            assert got["index_version"] == acked
            assert got["entities"][0]["id"] == "live:kill"
            assert all(e["id"] != victim for e in got["entities"])
            assert c.get(f"/v1/entities/{victim}").status_code == 404
    finally:
        second.stop()
