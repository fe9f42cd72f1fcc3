"""Admission control over real HTTP (reliability A1, A2, A3, B1, K1).

EL_STAGE_DELAY_MS makes the encode stage sleep before the model call, so requests stay in flight for a known
time; `el_model_invocations_total` on /metrics counts real encoder calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.hardening.server import Server, metric, running_many

pytestmark = [pytest.mark.slow, pytest.mark.onnx]

L, Q, EXTRA = 2, 4, 20  # A1: in-flight cap, queue cap, requests beyond both
# Delays are seconds long so that "answered at once" and "answered at the deadline" are proved by order (the
# answer came while other work still ran), with room for a loaded machine; no assertion is a stopwatch bound.
BUSY_DELAY_S = 2.0
# A2/B1 (L=1): A must finish inside the deadline (1 s to spare for its model call on a loaded box), B must
# still be in its delayed stage at its deadline, C still queued at its deadline (about 1 s either way).
DEADLINE_S, DEADLINE_DELAY_S = 3.0, 2.0
BODY = {"mention": "Douglas Adams", "top_k": 1}


@pytest.fixture(scope="module")
def servers(settings) -> list[Server]:
    # Batching off: these count one model call and one stage sample per request (coalescing is
    # tests/service/test_batching_api.py's subject).
    busy = {"EL_ADMISSION__MAX_IN_FLIGHT": L, "EL_ADMISSION__MAX_QUEUE": Q,
            "EL_STAGE_DELAY_MS": int(BUSY_DELAY_S * 1000), "EL_BATCHING__ENABLED": "false"}
    short = {"EL_ADMISSION__MAX_IN_FLIGHT": 1, "EL_ADMISSION__MAX_QUEUE": 4,
             "EL_STAGE_DELAY_MS": int(DEADLINE_DELAY_S * 1000), "EL_ADMISSION__REQUEST_TIMEOUT_S": DEADLINE_S}
    with running_many(settings, [busy, short]) as started:
        yield started


@pytest.fixture(scope="module")
def busy(servers: list[Server]) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def short_deadline(servers: list[Server]) -> Server:
    return servers[1]


def invocations_per_request(server: Server) -> float:
    """Encoder calls one text-only /v1/link costs (two: mention+context, mention alone, or however the model runs)."""
    before = metric(server.metrics(), "el_model_invocations_total")
    with server.client() as c:
        assert c.post("/v1/link", json=BODY).status_code == 200
    cost = metric(server.metrics(), "el_model_invocations_total") - before
    assert cost >= 1
    return cost


def fire(server: Server, offsets_s: list[float], body: dict = BODY, timeout_s: float = 30.0,
         during: Callable[[], None] | None = None) -> list[tuple[object, float, float]]:
    """One POST /v1/link per offset (seconds after a common start), each on its own pre-opened connection;
    `during` runs meanwhile. Returns (response or exception, sent, answered) in order, as this process's
    `time.perf_counter()` readings: for ordering answers against each other.
    """
    clients = [server.client(timeout=timeout_s) for _ in offsets_s]
    for c in clients:
        assert c.get("/healthz").status_code == 200  # the connection is open before the race starts
    barrier = threading.Barrier(len(clients))

    def one(i: int) -> tuple[object, float, float]:
        barrier.wait()
        time.sleep(offsets_s[i])
        t0 = time.perf_counter()
        try:
            r: object = clients[i].post("/v1/link", json=body)
        except httpx.HTTPError as exc:
            r = exc
        return r, t0, time.perf_counter()

    try:
        with ThreadPoolExecutor(len(clients)) as ex:
            results = ex.map(one, range(len(clients)))
            if during is not None:
                during()
            return list(results)
    finally:
        for c in clients:
            c.close()


def test_a1_burst_serves_exactly_the_caps_and_refuses_the_rest_fast(busy: Server) -> None:
    cost = invocations_per_request(busy)
    before = busy.metrics()
    n = L + Q + EXTRA
    seen: dict[str, float] = {}

    def watch() -> None:  # K1: queue depth and in-flight while the burst is held
        time.sleep(BUSY_DELAY_S / 2)
        mid = busy.metrics()
        seen.update(queue=metric(mid, "el_queue_depth"), in_flight=metric(mid, "el_in_flight"))

    out = fire(busy, [0.0] * n, during=watch)
    after = busy.metrics()

    statuses = sorted(r.status_code for r, _, _ in out)  # type: ignore[union-attr]
    assert statuses == [200] * (L + Q) + [429] * EXTRA, statuses
    for r, _, _ in out:
        assert isinstance(r, httpx.Response)
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json() == {"error": {"code": "overloaded", "message": "server is at capacity, retry later"}}
    assert seen == {"queue": Q, "in_flight": L}
    # Every refusal was immediate: answered before the first served request (BUSY_DELAY_S of work) was.
    first_served = min(done for r, _, done in out if r.status_code == 200)  # type: ignore[union-attr]
    last_refused = max(done for r, _, done in out if r.status_code == 429)  # type: ignore[union-attr]
    assert last_refused < first_served, (last_refused, first_served)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("el_rejections_total", reason="queue_full") == EXTRA
    assert delta("el_requests_total", route="/v1/link", status="429") == EXTRA
    assert delta("el_requests_total", route="/v1/link", status="200") == L + Q
    assert sum(v for (name, lab), v in after.items() if name == "el_requests_total"
               and dict(lab)["status"].startswith("5") and dict(lab)["route"] != "/readyz") == 0
    assert delta("el_stage_latency_seconds_count", stage="encode") == L + Q
    assert delta("el_model_invocations_total") == (L + Q) * cost  # refused requests never reached the model
    assert metric(after, "el_queue_depth") == 0 and metric(after, "el_in_flight") == 0


def test_a3_client_gone_while_queued_costs_no_model_call(busy: Server) -> None:
    cost = invocations_per_request(busy)
    before = busy.metrics()
    # Two requests take both slots; a third waits in the queue and its client gives up after 0.4 s.
    holders = [busy.client() for _ in range(L)]
    results: list[int] = []

    def hold(c: httpx.Client) -> None:
        results.append(c.post("/v1/link", json=BODY).status_code)

    threads = [threading.Thread(target=hold, args=(c,)) for c in holders]
    for t in threads:
        t.start()
    time.sleep(0.2)
    with busy.client(timeout=0.4) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/link", json=BODY)
    for t in threads:
        t.join()
    for c in holders:
        c.close()
    time.sleep(0.3)  # the dropped request would have had a slot by now
    after = busy.metrics()
    assert results == [200] * L

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("el_rejections_total", reason="client_disconnected") == 1
    assert delta("el_model_invocations_total") == L * cost
    assert "Traceback" not in busy.log()  # answering a departed client is not an error
    assert delta("el_stage_latency_seconds_count", stage="encode") == L
    assert metric(after, "el_queue_depth") == 0 and metric(after, "el_in_flight") == 0


def test_a2_b1_deadline_in_queue_and_while_running(short_deadline: Server) -> None:
    """L=1, deadline 3.0 s, stage delay 2.0 s: A runs 0-2.0 s (200); B gets the slot at ~2.05 s and passes its
    deadline inside the delayed stage (504 at the deadline, and the model is not called for it); C is still
    queued at its deadline (504, never reaches the model)."""
    server = short_deadline
    cost = invocations_per_request(server)
    before = server.metrics()
    out = fire(server, [0.0, 0.03, 0.06])
    # B's worker thread runs on after its 504 (until ~4.05 s): it still holds the only slot.
    during = server.metrics()
    give_up = time.monotonic() + 60  # only a hung worker thread comes near this
    while metric(server.metrics(), "el_in_flight") and time.monotonic() < give_up:
        time.sleep(0.05)
    after = server.metrics()
    assert metric(during, "el_in_flight") == 1
    (a, _, _), (b, b_sent, b_done), (c, c_sent, c_done) = out
    assert isinstance(a, httpx.Response) and a.status_code == 200, a
    assert isinstance(b, httpx.Response) and isinstance(c, httpx.Response)
    assert b.json() == {"error": {"code": "deadline_exceeded", "message": "request deadline exceeded"}}
    assert c.json() == {"error": {"code": "deadline_exceeded", "message": "deadline passed while queued"}}
    for r, sent, done in ((b, b_sent, b_done), (c, c_sent, c_done)):
        assert r.status_code == 504
        assert done - sent >= DEADLINE_S * 0.9, done - sent  # not before its deadline
    # B1, and not after it: both were answered while B's abandoned work still held the only slot (`during`).

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("el_rejections_total", reason="deadline_running") == 1
    assert delta("el_rejections_total", reason="deadline_queued") == 1
    assert delta("el_model_invocations_total") == cost  # only A reached the model
    assert metric(after, "el_in_flight") == 0

