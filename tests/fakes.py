"""Deterministic fakes of the heavy backend, so the HTTP, admission and job tests run in seconds without the real
encoders, the benchmark data or an index: `create_app(settings, linker_factory=FakeLinker.factory(...))`.

`FakeLinker` has the public surface of `service.pipeline.linker.Linker` that the app, the routes and the job
worker use: `index` (version, entities, row_of, len), `model_version`, `runtime.invocations`, `warm_up()`,
`link_batch(queries, deadline=...)` and `swap_index(folder)`. It encodes with `fake_vector`, a unit vector
seeded by a hash of the text (and of the image's pixels), and ranks a small in-memory KG by dot product: a
mention spelled exactly like an entity's name scores 1.0 for that entity, anything else scores near 0.

For ordering tests, a `gate` (threading.Event) holds every link_batch call until the test sets it; `started`
counts the calls that reached the model, and `threads` records the thread each ran in.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kg_index.load import EntityMeta
from kg_index.manifest import IndexIntegrityError
from service.errors import DeadlineExceeded
from service.pipeline.linker import BatchOutcome
from service.pipeline.types import Candidate, LinkQuery, LinkResult
from service.settings import Settings

DIM = 64
FAKE_KG = [
    EntityMeta("Q42", "Douglas Adams", "English writer and humorist (1952-2001).", True, 1952, 2001),
    EntityMeta("Q91", "Abraham Lincoln", "16th president of the United States.", False, 1809, 1865),
    EntityMeta("Q859", "Plato", "Ancient Greek philosopher.", False),
    EntityMeta("Q1339", "Johann Sebastian Bach", "German composer.", True, 1685, 1750),
    EntityMeta("Q7186", "Marie Curie", "Physicist and chemist.", True, 1867, 1934),
    EntityMeta("Q937", "Albert Einstein", "Theoretical physicist.", True, 1879, 1955),
    EntityMeta("Q5879", "Johann Wolfgang von Goethe", "German writer.", False, 1749, 1832),
    EntityMeta("Q1035", "Charles Darwin", "English naturalist.", True, 1809, 1882),
    EntityMeta("Q8023", "Nelson Mandela", "President of South Africa.", True, 1918, 2013),
    EntityMeta("Q762", "Leonardo da Vinci", "Italian polymath.", True, 1452, 1519),
    EntityMeta("Q5582", "Vincent van Gogh", "Dutch painter.", True, 1853, 1890),
    EntityMeta("Q1001", "Mahatma Gandhi", "Indian lawyer and activist.", False, 1869, 1948),
]


def fake_vector(text: str, image_key: bytes | None = None) -> np.ndarray:
    """A deterministic unit vector: the same text (and image pixels) always give the same vector."""
    seed = hashlib.sha256(text.casefold().encode()).digest()
    v = np.random.default_rng(int.from_bytes(seed[:8], "little")).standard_normal(DIM)
    if image_key is not None:  # an image nudges the vector: a different answer, still deterministic
        img_seed = hashlib.sha256(image_key).digest()
        v = v + 0.5 * np.random.default_rng(int.from_bytes(img_seed[:8], "little")).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


@dataclass
class FakeIndex:
    """The index surface the routes read: version, entities, row_of, len()."""

    entities: list[EntityMeta]
    version: str = "fake-index@1"
    row_of: dict[str, int] = field(init=False)
    vectors: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.row_of = {e.id: i for i, e in enumerate(self.entities)}
        self.vectors = np.stack([fake_vector(e.name) for e in self.entities])

    def __len__(self) -> int:
        return len(self.entities)


@dataclass
class FakeRuntime:
    invocations: int = 0  # behind el_model_invocations_total: proof that a refusal cost no model call


@dataclass
class FakeStore:
    """What the entity-change routes read of a live store: changes applied, whether a compaction runs."""

    pending: int = 0
    compacting: bool = False
    compactions: int = 0


@dataclass(frozen=True)
class FakeRow:
    meta: EntityMeta


class FakeLinker:
    model_version = "fake-encoder@0"

    def __init__(self, settings: Settings, entities: list[EntityMeta] | None = None, *,
                 gate: threading.Event | None = None) -> None:
        self.settings = settings
        self.runtime = FakeRuntime()
        self.gate = gate
        self.started = 0  # link_batch calls that reached the model (warm-up excluded)
        self.threads: list[int] = []  # thread id of each such call
        self.queries: list[list[LinkQuery]] = []
        self._index = FakeIndex(list(entities or FAKE_KG))
        self._lock = threading.Lock()
        self._warm = False
        self.store: FakeStore | None = FakeStore()
        self.encoded: list[int] = []  # entities per encode_entities call

    @classmethod
    def factory(cls, **kwargs: object) -> Callable[[Settings], FakeLinker]:
        """A linker_factory for create_app; the linker it made is `factory.made[-1]`."""
        made: list[FakeLinker] = []

        def make(settings: Settings) -> FakeLinker:
            made.append(cls(settings, **kwargs))  # type: ignore[arg-type]
            return made[-1]

        make.made = made  # type: ignore[attr-defined]
        return make

    @property
    def index(self) -> FakeIndex:
        return self._index

    def sync(self) -> None:
        """One process: nothing logged elsewhere to take in."""

    @property
    def source_warning(self) -> str | None:
        """The fake KG is always the configured one (the real check: service/index_source.py)."""
        return None

    def warm_up(self) -> None:
        self._warm = True

    def swap_index(self, folder: Path) -> FakeIndex:
        """A fake index folder is one `entities.json`: [[id, name, description], ...]."""
        path = Path(folder) / "entities.json"
        if not path.is_file():
            raise IndexIntegrityError(f"{path}: missing")
        rows = json.loads(path.read_text())
        new = FakeIndex([EntityMeta(i, n, d, False) for i, n, d in rows], version=f"fake-index@{path.stat().st_size}")
        self._index = new
        return new

    def encode_entities(self, metas: list[EntityMeta], images: list) -> list[FakeRow]:
        """Entity "features" are the metadata itself (the fake index re-derives vectors from names)."""
        self.encoded.append(len(metas))
        return [FakeRow(m) for m in metas]

    def apply_changes(self, changes: list) -> FakeIndex:
        """Put/delete in order, all or nothing, as the real live store does (UnknownEntity for a missing id)."""
        from kg_index.live_store import UnknownEntity

        assert self.store is not None
        ents = {e.id: e for e in self._index.entities}
        for c in changes:
            if c.row is None:
                if c.id not in ents:
                    raise UnknownEntity(c.id)
                del ents[c.id]
            else:
                ents[c.id] = c.row.meta
        self.store.pending += len(changes)
        base = self._index.version.split("+")[0]
        self._index = FakeIndex(list(ents.values()), version=f"{base}+{self.store.pending}")
        return self._index

    def compact(self) -> FakeIndex:
        assert self.store is not None
        self.store.compactions += 1
        self.store.pending = 0
        self._index = FakeIndex(list(self._index.entities), version=f"fake-index@c{self.store.compactions}")
        return self._index

    def link(self, query: LinkQuery) -> LinkResult:
        return self.link_batch([query]).results[0]

    def link_batch(self, queries: list[LinkQuery], *, rerank: bool | None = None,
                   deadline: float | None = None) -> BatchOutcome:
        if self._warm:
            with self._lock:
                self.started += 1
                self.threads.append(threading.get_ident())
                self.queries.append(list(queries))
            if self.gate is not None:
                self.gate.wait(30)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("request deadline exceeded")
        self.runtime.invocations += 1
        t0 = time.perf_counter()
        index = self._index
        results = []
        for q in queries:
            key = q.image.tobytes() if q.image is not None else None
            scores = index.vectors @ fake_vector(q.mention, key)
            order = np.argsort(-scores, kind="stable")[: q.top_k]
            ents = [Candidate(id=index.entities[r].id, name=index.entities[r].name, score=float(scores[r]),
                              retrieval_score=float(scores[r])) for r in order]
            nil = not ents or ents[0].score < self.settings.nil_threshold
            # a fake confidence: the top score squashed into [0, 1] (the real one is calibrated, service/pipeline/calibration.py)
            confidence = float(1 / (1 + np.exp(-4 * ents[0].score))) if ents else None
            results.append(LinkResult(q.mention, ents, nil, index.version, self.model_version, id=q.id,
                                      confidence=confidence))
        total = (time.perf_counter() - t0) * 1000
        timings = {"encode": total / 2, "retrieve": total / 2, "respond": 0.0, "total": total}
        for r in results:
            r.timings_ms = dict(timings)
        return BatchOutcome(results, [], timings)
