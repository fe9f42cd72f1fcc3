"""Micro-batching through the real app: concurrent /v1/link and /v1/link/batch requests share link_batch calls,
each gets its own answer, and el_batch_size shows it. Once over the fake backend (fast), once over the real
Linker (slow).

To make coalescing deterministic, the first link_batch call is held until the other requests have queued in
the batcher (one batch at a time: EL_BATCHING__MAX_CONCURRENT=1); the rest must then go in one call.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.pipeline.linker import BatchOutcome
from service.pipeline.types import LinkQuery
from service.settings import Settings
from tests.fakes import FakeLinker
from tests.server_process import metric, scrape
from tests.service.test_api_fake import eventually, serve

NAMES = ["Plato", "Marie Curie", "Charles Darwin", "Nelson Mandela", "Vincent van Gogh"]


def test_concurrent_requests_are_coalesced_into_one_link_batch_call(tmp_path: Path) -> None:
    gate = threading.Event()
    with serve(tmp_path, gate=gate, batching={"max_concurrent": 1}) as (client, fake):
        assert fake is not None
        batcher = client.app.state.el.batcher  # type: ignore[attr-defined]
        with ThreadPoolExecutor(8) as pool:
            holder = pool.submit(client.post, "/v1/link", json={"mention": "Douglas Adams", "top_k": 1})
            eventually(lambda: fake.started == 1, "the first request to reach the model")
            singles = [pool.submit(client.post, "/v1/link", json={"mention": n, "top_k": 1}) for n in NAMES]
            batch = pool.submit(client.post, "/v1/link/batch",
                                json={"items": [{"id": "a", "mention": "Plato"}, {"id": "b", "mention": "Goethe"}]})
            eventually(lambda: batcher.queued["interactive"] == len(NAMES) + 1, "the requests to queue")
            gate.set()
            answers = [f.result(30) for f in (holder, *singles, batch)]
        assert [r.status_code for r in answers] == [200] * (len(NAMES) + 2)
        assert [r.json()["entities"][0]["name"] for r in answers[:-1]] == ["Douglas Adams", *NAMES]
        assert [item["id"] for item in answers[-1].json()["results"]] == ["a", "b"]
        assert [len(call) for call in fake.queries] == [1, len(NAMES) + 2]  # 7 requests, 8 mentions, 2 calls
        m = scrape(client)
        assert metric(m, "el_batch_size_count", kind="interactive") == 2
        assert metric(m, "el_batch_size_sum", kind="interactive") == len(NAMES) + 3
        assert metric(m, "el_batch_queue_wait_seconds_count", kind="interactive") == len(NAMES) + 2
        assert metric(m, "el_stage_latency_seconds_count", stage="encode") == 2  # stage metrics: once per batch


class _Fragile(FakeLinker):
    """Fails any batch that holds the mention "poison" (as a pipeline bug triggered by one input would)."""

    def link_batch(self, queries: list[LinkQuery], **kwargs: Any) -> BatchOutcome:
        out = super().link_batch(queries, **kwargs)  # counted and held at the gate like any call
        if any(q.mention == "poison" for q in queries):
            raise RuntimeError("boom")
        return out


def test_a_bad_request_fails_alone_among_coalesced_neighbours(tmp_path: Path) -> None:
    gate = threading.Event()
    factory = _Fragile.factory(gate=gate)
    settings = Settings(jobs={"dir": tmp_path / "jobs"}, batching={"max_concurrent": 1})
    # a 500 is the answer under test, not an error of the test client
    with TestClient(create_app(settings, linker_factory=factory), raise_server_exceptions=False) as client:
        eventually(lambda: client.get("/readyz").status_code == 200, "the app to load")
        fake = factory.made[-1]  # type: ignore[attr-defined]
        batcher = client.app.state.el.batcher  # type: ignore[attr-defined]
        with ThreadPoolExecutor(4) as pool:
            holder = pool.submit(client.post, "/v1/link", json={"mention": "Douglas Adams"})
            eventually(lambda: fake.started == 1, "the first request to reach the model")
            out = [pool.submit(client.post, "/v1/link", json={"mention": m}) for m in ("Plato", "poison", "Marie Curie")]
            eventually(lambda: batcher.queued["interactive"] == 3, "the requests to queue")
            gate.set()
            answers = [f.result(30) for f in (holder, *out)]
    assert [r.status_code for r in answers] == [200, 200, 500, 200]
    assert answers[2].json() == {"error": {"code": "internal", "message": "internal server error"}}
    assert [r.json()["entities"][0]["name"] for r in answers[1::2]] == ["Plato", "Marie Curie"]
    # the shared call failed; then each request ran alone (in the order they queued, which the threads decide)
    calls = [[q.mention for q in call] for call in fake.queries]
    assert calls[0] == ["Douglas Adams"] and sorted(calls[1]) == ["Marie Curie", "Plato", "poison"]
    assert calls[2:] == [[m] for m in calls[1]]


class _Held:
    """The real Linker, with its first link_batch call after `arm()` held until `release` is set."""

    def __init__(self, linker: Any) -> None:
        self._linker = linker
        self.armed = False
        self.held = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._linker, name)

    def arm(self) -> None:
        self.armed = True

    def link_batch(self, queries: list[LinkQuery], **kwargs: Any) -> BatchOutcome:
        if self.armed:
            self.calls.append(len(queries))
            if not self.held.is_set():
                self.held.set()
                assert self.release.wait(60)
        return self._linker.link_batch(queries, **kwargs)


@pytest.mark.slow
def test_real_linker_answers_coalesced_requests_as_it_answers_them_alone(settings: Settings, linker: Any,
                                                                          tmp_path: Path) -> None:
    mentions = [("Douglas Adams", "Douglas Adams wrote The Hitchhiker's Guide to the Galaxy."),
                ("Paris", "The Eiffel Tower is in Paris."), ("Obama", "Barack Obama was president."),
                ("Einstein", "Einstein published the theory of relativity."), ("London", "He moved to London.")]
    alone = {m: linker.link(LinkQuery(m, c, None, top_k=3)) for m, c in mentions}
    held = _Held(linker)
    cfg = settings.model_copy(update={"batching": settings.batching.model_copy(update={"max_concurrent": 1}),
                                      "jobs": settings.jobs.model_copy(update={"dir": tmp_path / "jobs"})})
    with TestClient(create_app(cfg, linker_factory=lambda _: held)) as client:  # type: ignore[arg-type,return-value]
        eventually(lambda: client.get("/readyz").status_code == 200, "the app to load")
        held.arm()
        batcher = client.app.state.el.batcher  # type: ignore[attr-defined]
        with ThreadPoolExecutor(len(mentions) + 1) as pool:
            first = pool.submit(client.post, "/v1/link", json={"mention": "Plato", "top_k": 3})
            assert held.held.wait(60)
            rest = [pool.submit(client.post, "/v1/link", json={"mention": m, "context": c, "top_k": 3})
                    for m, c in mentions]
            eventually(lambda: batcher.queued["interactive"] == len(mentions) or any(f.done() for f in rest),
                       "the requests to queue")
            early = [f.result().text for f in rest if f.done()]
            assert not early, early  # none answered before the held batch ended
            held.release.set()
            assert first.result(60).status_code == 200
            answers = [f.result(60) for f in rest]
        assert held.calls == [1, len(mentions)]
        for (m, _), r in zip(mentions, answers, strict=True):
            assert r.status_code == 200
            body = r.json()
            assert body["mention"] == m
            got = [(e["id"], e["score"]) for e in body["entities"]]
            want = [(e.id, e.score) for e in alone[m].entities]
            assert [i for i, _ in got] == [i for i, _ in want], m
            assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-3), m
        m = scrape(client)
        assert metric(m, "el_batch_size_count", kind="interactive") == 2
        assert metric(m, "el_batch_size_sum", kind="interactive") == len(mentions) + 1  # one batch held all five


@pytest.mark.slow
def test_a_job_alone_runs_in_batches_of_job_idle_batch(settings: Settings, linker: Any, tmp_path: Path,
                                                       test_mentions: Any) -> None:
    """The real app and Linker, no interactive traffic: a 20-item job goes through the batcher in one batch (the
    default job_idle_batch, 64), not in job_max_batch pieces; with job_idle_batch = job_max_batch it is cut up."""
    items = [{"id": f"j{i}", "mention": m.mention, "context": m.context, "top_k": 3}
             for i, m in enumerate(test_mentions[:20])]
    for idle_batch, want_batches in ((64, 1), (8, 3)):
        batching = settings.batching.model_copy(update={"job_max_batch": 8, "job_idle_batch": idle_batch})
        cfg = settings.model_copy(update={"batching": batching, "jobs": settings.jobs.model_copy(
            update={"dir": tmp_path / f"jobs-{idle_batch}", "chunk_size": 64, "poll_interval_s": 0.05})})
        with TestClient(create_app(cfg, linker_factory=lambda _: linker)) as client:
            eventually(lambda: client.get("/readyz").status_code == 200, "the app to load")
            job_id = client.post("/v1/jobs", json={"items": items}).json()["job_id"]
            eventually(lambda job_id=job_id: client.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded",
                       "the job to finish")
            m = scrape(client)
            assert metric(m, "el_batch_size_sum", kind="job") == len(items)
            assert metric(m, "el_batch_size_count", kind="job") == want_batches, idle_batch
