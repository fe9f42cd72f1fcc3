"""The live index without encoders: synthetic rows over real index folders (Flat, HNSW, IVF) written and verified
by the same code as the service's; searches are checked against brute force over the live rows."""

from __future__ import annotations

import shutil
import threading
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest

from kg_index import compact as compact_mod
from kg_index.changelog import LOG_NAME, ChangeLog, encode_record, read_log
from kg_index.exact import ExactSearch
from kg_index.live import Change, EntityRow, LiveIndex, Stacked
from kg_index.live_store import LiveStore, UnknownEntity
from kg_index.load import EntityMeta, KGIndex, load_index
from kg_index.manifest import IndexIntegrityError, Manifest

D_LOCAL, T, P = 8, 6, 4
D = 4 * D_LOCAL


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_row(entity_id: str, name: str, rng: np.random.Generator, *, image: bool = False,
             vector: np.ndarray | None = None) -> EntityRow:
    seg = np.zeros(T, np.uint8)
    seg[:3] = [1, 1, 2]
    return EntityRow(EntityMeta(entity_id, name, f"About {name}.", image, 1900, 1950),
                     vector if vector is not None else _unit(rng.standard_normal(D)),
                     rng.standard_normal((T, D_LOCAL)).astype(np.float16), seg,
                     rng.standard_normal((P, D_LOCAL)).astype(np.float16) if image else None,
                     rng.standard_normal((2, D_LOCAL)).astype(np.float16))


def make_folder(root: Path, factory: str, n: int = 300, seed: int = 0) -> Path:
    """A real index folder of n synthetic entities (every 10th with an image), written by write_compacted."""
    rng = np.random.default_rng(seed)
    rows = [make_row(f"E{i}", f"entity {i}", rng, image=i % 10 == 0) for i in range(n)]
    vectors = np.stack([r.global_ for r in rows])
    index = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    src = root / f"src-{factory.replace(',', '_')}"
    src.mkdir(parents=True)
    np.save(src / "image_blank.npy", np.zeros((P, D_LOCAL), np.float16))
    img = [r.image_local for r in rows if r.image_local is not None]
    image_rows = np.full(n, -1, np.int32)
    image_rows[[i for i, r in enumerate(rows) if r.image_local is not None]] = np.arange(len(img))
    m = Manifest(version="v0", built_at="", kg="synthetic", encoder={}, encoder_signature="sig", n_entities=n,
                 n_images=len(img), global_dim=D, local_dim=D_LOCAL, max_tokens=T, image_patches=P,
                 faiss_factory=factory, heads="student@synthetic")
    snap = KGIndex(src, m, index, [r.meta.id for r in rows], [r.meta for r in rows],
                   {r.meta.id: i for i, r in enumerate(rows)}, None, np.stack([r.text_local for r in rows]),
                   np.stack([r.text_seg for r in rows]), image_rows, np.stack(img),
                   np.stack([r.unit_globals for r in rows]), np.zeros((P, D_LOCAL), np.float16),
                   ExactSearch.for_index(index))
    out = root / f"index-{factory.replace(',', '_')}"
    compact_mod.write_compacted(snap, out)
    return out


FACTORIES = ["Flat", "HNSW32,Flat", "IVF4,Flat"]


@pytest.fixture(scope="module", params=FACTORIES)
def folder(request, tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("live"), request.param)


@pytest.fixture
def base(folder: Path, tmp_path: Path) -> KGIndex:
    copy = tmp_path / "index"
    shutil.copytree(folder, copy)
    index = load_index(copy)
    faiss.ParameterSpace().set_index_parameter(index.faiss_index, "nprobe", 4) if "IVF" in index.manifest.faiss_factory else None
    return index


def brute(index: KGIndex, q: np.ndarray, k: int) -> list[list[str]]:
    """The ids of the top k live rows by inner product (the exact answer)."""
    assert index.delta is not None
    live = np.flatnonzero(~index.delta.dead)
    vecs = np.stack([_vector(index, r) for r in live])
    order = np.argsort(-(q @ vecs.T), axis=1)[:, :k]
    return [[index.ids[live[j]] for j in row] for row in order]


def _vector(index: KGIndex, row: int) -> np.ndarray:
    assert index.delta is not None
    if row >= index.delta.n_base:
        return index.delta.vectors[row - index.delta.n_base].numpy()
    return compact_mod.base_vectors(index, np.array([row]))[0]


def test_stacked_reads_like_one_array() -> None:
    rng = np.random.default_rng(1)
    base, tail = rng.standard_normal((5, 3, 4)), rng.standard_normal((2, 3, 4))
    both = np.concatenate([base, tail])
    s = Stacked(base, tail)
    assert s.shape == (7, 3, 4) and len(s) == 7
    for key in ([0, 6, 2, 5], np.array([[1, 6], [5, 0]]), np.array([6, 5]), np.array([0, 1])):
        np.testing.assert_array_equal(s[key], both[np.asarray(key)])
        np.testing.assert_array_equal(s[np.asarray(key), :2], both[np.asarray(key), :2])
    np.testing.assert_array_equal(s[6], both[6])
    np.testing.assert_array_equal(np.asarray(s), both)


def test_put_delete_replace_search(base: KGIndex) -> None:
    rng = np.random.default_rng(7)
    live = LiveIndex(base)
    q = _unit(rng.standard_normal((6, D)))
    target = q[0].copy()
    snap = live.apply([Change("NEW", make_row("NEW", "newcomer", rng, image=True, vector=target)),
                       Change("E3", None),  # removed
                       Change("E5", make_row("E5", "entity five renamed", rng, vector=q[1].copy()))])  # replaced
    assert snap.version == "v0+3" if base.version == "v0" else snap.version.endswith("+3")
    assert len(snap) == len(base) and len(snap.ids) == len(base.ids) + 2
    _scores, rows = snap.search(q, 10)
    ids = [[snap.ids[r] for r in row] for row in rows]
    assert ids[0][0] == "NEW" and ids[1][0] == "E5"
    assert snap.entities[rows[1][0]].name == "entity five renamed"
    assert all("E3" not in row for row in ids)
    assert all(rows[i].tolist().count(base.row_of["E5"]) == 0 for i in range(len(q)))  # the old E5 row never
    if base.exact is not None:  # exact: the very answer of brute force over the live rows
        assert ids == brute(snap, q, 10)
    # The rerank's reads see the appended row's features
    new = snap.row_of["NEW"]
    assert snap.image_rows[new] >= base.n_image_rows
    np.testing.assert_array_equal(snap.image_local[np.array([snap.image_rows[new]])][0],
                                  live._image_local.view()[0])
    assert snap.row_of.get("E3") is None and "E3" not in snap.row_of and snap.row_of["E5"] == new + 1


def test_deleting_most_rows_never_returns_them(base: KGIndex) -> None:
    rng = np.random.default_rng(3)
    live = LiveIndex(base)
    gone = [f"E{i}" for i in range(0, 300, 2)]
    snap = live.apply([Change(i, None) for i in gone])
    q = _unit(rng.standard_normal((20, D)))
    _, rows = snap.search(q, 32)
    assert (rows >= 0).all()
    returned = {snap.ids[r] for r in rows.reshape(-1)}
    assert not returned & set(gone)
    assert len(snap) == 150


def test_snapshots_are_immutable(base: KGIndex) -> None:
    rng = np.random.default_rng(5)
    live = LiveIndex(base)
    q = _unit(rng.standard_normal((4, D)))
    first = live.apply([Change("A", make_row("A", "a", rng, vector=q[0].copy()))])
    before = first.search(q, 5)
    text_before = np.array(first.text_local[np.array([first.row_of["A"]])])
    for i in range(600):  # grows every buffer past its capacity several times
        live.apply([Change(f"X{i}", make_row(f"X{i}", "x", rng)), Change("A", make_row("A", "a2", rng))])
    after = first.search(q, 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(text_before, first.text_local[np.array([first.row_of["A"]])])
    assert first.version.endswith("+1") and live.snapshot.version.endswith("+1201")


def test_log_round_trip_torn_tail_and_corruption(base: KGIndex) -> None:
    rng = np.random.default_rng(11)
    log = ChangeLog(base.folder, base.version)
    changes = [Change("N1", make_row("N1", "one", rng, image=True)), Change("E1", None),
               Change("N2", make_row("N2", "two", rng))]
    with log.locked():
        assert log.read_new() == [] and log.append(changes) == 3
    log.close()
    back = read_log(base.folder, base.version)
    assert [c.id for c in back] == ["N1", "E1", "N2"] and back[1].row is None
    np.testing.assert_array_equal(back[0].row.image_local, changes[0].row.image_local)
    np.testing.assert_array_equal(back[2].row.global_, changes[2].row.global_)
    assert back[0].row.meta == changes[0].row.meta
    path = base.folder / LOG_NAME
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # a crash in the middle of the last write: that change was never acknowledged
    assert [c.id for c in read_log(base.folder, base.version)] == ["N1", "E1"]
    assert path.stat().st_size < len(whole) - 7  # cut back to the last whole record
    flipped = bytearray(whole)
    flipped[60] ^= 0xFF  # inside the first record, with others after it
    path.write_bytes(bytes(flipped))
    with pytest.raises(IndexIntegrityError, match="record 1 .*checksum mismatch"):
        read_log(base.folder, base.version)
    path.write_bytes(whole)
    with pytest.raises(IndexIntegrityError, match="belongs to index"):
        read_log(base.folder, "another-version")


def test_store_replays_and_compacts(base: KGIndex) -> None:
    rng = np.random.default_rng(13)
    store = LiveStore(base)
    q = _unit(rng.standard_normal((3, D)))
    store.apply([Change("N1", make_row("N1", "one", rng, image=True, vector=q[0].copy())), Change("E7", None)])
    with pytest.raises(UnknownEntity):
        store.apply([Change("N9", make_row("N9", "nine", rng)), Change("NOPE", None)])
    assert store.snapshot.row_of.get("N9") is None  # all or nothing
    want = [[store.snapshot.ids[r] for r in row] for row in store.snapshot.search(q, 8)[1]]
    store.close()

    # A restart: the folder is loaded again and the log replayed
    again = LiveStore(load_index(base.folder))
    assert again.snapshot.version == f"{base.version}+2"
    assert [[again.snapshot.ids[r] for r in row] for row in again.snapshot.search(q, 8)[1]] == want

    # Compaction, with a change arriving while the new folder is written: it is carried over
    real_write = compact_mod.write_compacted

    def write_then_change(snap, out):
        manifest = real_write(snap, out)
        again.apply([Change("LATE", make_row("LATE", "late", rng, vector=q[2].copy()))])
        return manifest

    compact_mod.write_compacted = write_then_change
    try:
        import kg_index.live_store as live_store_mod

        live_store_mod.write_compacted = write_then_change
        snap = again.compact()
    finally:
        compact_mod.write_compacted = real_write
        live_store_mod.write_compacted = real_write
    assert snap.version.endswith("+1") and snap.delta is not None and snap.delta.n_base == len(base)
    m = Manifest.read(base.folder)
    assert m.compacted is not None and m.compacted["changes"] == 2 and m.n_entities == len(base)
    assert "E7" not in m.__dict__.get("ids", []) and load_index(base.folder).row_of.get("E7") is None
    ids = [[snap.ids[r] for r in row] for row in snap.search(q, 8)[1]]
    assert ids[0][0] == "N1" and ids[2][0] == "LATE"
    if base.exact is not None:
        assert ids[:2] == [w[:8] for w in want[:2]]
    again.close()
    reopened = LiveStore(load_index(base.folder))
    assert reopened.snapshot.version == snap.version and reopened.snapshot.row_of.get("LATE") is not None
    assert not list(base.folder.parent.glob(".*compacting*"))
    reopened.close()


def _ids(store: LiveStore, q: np.ndarray, k: int = 8) -> list[list[str]]:
    snap = store.snapshot
    return [[snap.ids[r] for r in row if r >= 0] for row in snap.search(q, k)[1]]


def test_two_processes_share_one_log(base: KGIndex) -> None:
    """Two stores on one folder (each with its own log handle and lock, as two server processes have): a change
    either logs is seen by the other's next sync, in the same order and under the same version; a removal checks
    against the other's changes too; a follower sees a torn record only once it is whole."""
    rng = np.random.default_rng(17)
    q = _unit(rng.standard_normal((2, D)))
    a, b = LiveStore(base), LiveStore(load_index(base.folder))
    a.apply([Change("A", make_row("A", "a", rng, vector=q[0].copy()))])
    assert b.snapshot.row_of.get("A") is None  # not before its sync
    b.sync()
    assert b.snapshot.version == a.snapshot.version == f"{base.version}+1" and _ids(b, q) == _ids(a, q)
    assert _ids(b, q)[0][0] == "A"
    b.apply([Change("B", make_row("B", "b", rng, vector=q[1].copy())), Change("E3", None)])
    a.sync()
    assert a.snapshot.version == b.snapshot.version == f"{base.version}+3" and _ids(a, q) == _ids(b, q)
    assert a.snapshot.row_of.get("E3") is None and _ids(a, q)[1][0] == "B"
    b.apply([Change("A", None)])
    with pytest.raises(UnknownEntity):  # b removed it first: a reads b's record under the lock, then refuses
        a.apply([Change("A", None)])
    assert a.snapshot.version == f"{base.version}+4"
    b.sync()
    assert b.snapshot.version == a.snapshot.version

    # A record being written by another process (here: half of it on disk) is not read until it is whole
    path = base.folder / LOG_NAME
    record = encode_record(5, base.version, Change("HALF", make_row("HALF", "half", rng)))
    with path.open("ab") as f:
        f.write(record[: len(record) // 2])
    b.sync()
    assert b.snapshot.version == f"{base.version}+4" and not b.log.moved()  # not re-read at every batch
    with path.open("ab") as f:
        f.write(record[len(record) // 2 :])
    assert b.log.moved()
    b.sync()
    assert b.snapshot.version == f"{base.version}+5" and b.snapshot.row_of.get("HALF") is not None
    a.close()
    b.close()
    again = LiveStore(load_index(base.folder))  # a restart replays what both wrote
    assert again.snapshot.version == f"{base.version}+5" and _ids(again, q) == _ids(b, q)
    again.close()


def test_one_compaction_at_a_time_and_the_other_process_follows_it(base: KGIndex) -> None:
    """a compacts while b goes on changing the index: b's change is carried into the new folder, b's own
    compaction is refused meanwhile, and b then serves the compacted folder (same version, same answers) and
    changes it."""
    import kg_index.live_store as live_store_mod
    from kg_index.changelog import LogBusy

    rng = np.random.default_rng(23)
    q = _unit(rng.standard_normal((3, D)))
    a, b = LiveStore(base), LiveStore(load_index(base.folder))
    a.apply([Change("A", make_row("A", "a", rng, vector=q[0].copy())), Change("E5", None)])
    real_write = compact_mod.write_compacted
    refused: list[Exception] = []

    def write_then_change(snap, out):
        manifest = real_write(snap, out)
        b.apply([Change("LATE", make_row("LATE", "late", rng, vector=q[2].copy()))])  # logged while a compacts
        try:
            b.compact()
        except LogBusy as exc:
            refused.append(exc)
        return manifest

    live_store_mod.write_compacted = write_then_change
    try:
        snap = a.compact()
    finally:
        live_store_mod.write_compacted = real_write
    assert len(refused) == 1 and "another process is compacting" in str(refused[0])
    assert snap.version.endswith("+1") and snap.row_of.get("LATE") is not None and snap.row_of.get("E5") is None
    assert b.snapshot.version != snap.version and b.log.swapped()
    b.sync()  # b loads the swapped-in folder and replays its log (the carried change)
    assert b.snapshot.version == snap.version and _ids(b, q) == _ids(a, q)
    assert _ids(b, q)[0][0] == "A" and _ids(b, q)[2][0] == "LATE"
    b.apply([Change("B", make_row("B", "b", rng, vector=q[1].copy()))])  # b appends to the new folder's log
    a.sync()
    assert a.snapshot.version == b.snapshot.version == f"{Manifest.read(base.folder).version}+2"
    assert _ids(a, q)[1][0] == "B"
    assert b.compact().version == Manifest.read(base.folder).version  # and may compact it in turn
    a.sync()
    assert a.snapshot.version == b.snapshot.version and _ids(a, q) == _ids(b, q)
    a.close()
    b.close()


def test_a_folder_rebuilt_in_place_is_followed_and_a_bad_one_is_not(base: KGIndex, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A build renames a new folder into the served path: the store loads it (through its loader, the checks of a
    reload) at its next sync. One that fails them is left alone: the old snapshot serves, tried once, not per batch.
    A killed compaction's leftover folder is cleared by the next compaction."""
    rng = np.random.default_rng(29)
    calls: list[Path] = []

    def loader(folder: Path) -> KGIndex:
        calls.append(folder)
        return load_index(folder)

    store = LiveStore(base, loader=loader)
    store.apply([Change("A", make_row("A", "a", rng))])
    rebuilt = make_folder(tmp_path / "rebuild", "Flat", n=50, seed=3)
    m = Manifest.read(rebuilt)
    m.version = "v-rebuilt"
    m.write(rebuilt)
    aside = base.folder.with_name("aside")
    base.folder.rename(aside)
    rebuilt.rename(base.folder)
    store.sync()
    assert store.snapshot.version == "v-rebuilt" and len(store.snapshot) == 50 and calls == [base.folder]
    assert store.snapshot.row_of.get("A") is None  # a rebuild starts from its KG file (README: Limits)

    broken = make_folder(tmp_path / "broken", "Flat", n=20, seed=4)
    (broken / "ids.json").write_text("[]")  # fails its checksum
    base.folder.rename(tmp_path / "aside2")
    broken.rename(base.folder)
    with caplog.at_level("ERROR"):
        store.sync()
        store.sync()
    assert store.snapshot.version == "v-rebuilt" and len(calls) == 2  # tried once
    assert "cannot load the index folder swapped in" in caplog.text
    store.close()

    stale = aside.parent / f".{aside.name}.compacting-99999999"
    stale.mkdir()
    (stale / "faiss.index").write_bytes(b"half")
    again = LiveStore(load_index(aside))
    again.apply([Change("B", make_row("B", "b", rng))])
    again.compact()
    assert not stale.exists()
    again.close()


def _append_many(folder: str, tag: str, n: int, start) -> None:
    """A separate process's writer: n changes, one request each, on the folder's shared log."""
    rng = np.random.default_rng(sum(map(ord, tag)))
    store = LiveStore(load_index(Path(folder)))
    start.wait(60)  # both loaded: their appends overlap
    for i in range(n):
        store.apply([Change(f"{tag}{i}", make_row(f"{tag}{i}", f"{tag} {i}", rng))])
    store.close()


def test_writers_in_separate_processes_interleave_without_loss(base: KGIndex) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(str(base.folder), tag, 60, start)) for tag in ("P", "Q")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = LiveStore(load_index(base.folder))
    assert store.snapshot.version == f"{base.version}+120"  # every record in sequence, none lost or doubled
    assert all(store.snapshot.row_of.get(f"{t}{i}") is not None for t in "PQ" for i in range(60))
    store.close()


def test_concurrent_reads_never_see_half_a_change(base: KGIndex) -> None:
    """A writer replaces an entity (old row dead, new row appended) while readers search: every snapshot has
    exactly one row for it."""
    rng = np.random.default_rng(19)
    live = LiveIndex(base)
    lock = threading.Lock()
    q = _unit(rng.standard_normal((1, D)))
    rows_made = [make_row("HOT", f"hot {i}", rng, vector=q[0].copy()) for i in range(200)]
    errors: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            snap = live.snapshot
            _, rows = snap.search(q, 5)
            hot = [r for r in rows[0] if r >= 0 and snap.ids[r] == "HOT"]
            if snap.row_of.get("HOT") is not None and len(hot) != 1:
                errors.append(f"{len(hot)} HOT rows in {snap.version}")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for r in rows_made:
        with lock:
            live.apply([Change("HOT", r)])
    done.set()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


def test_replace_keeps_other_fields(base: KGIndex) -> None:
    snap = LiveIndex(base).apply([Change("E0", None)])
    assert replace(snap.manifest) == base.manifest  # the base folder's manifest is untouched
