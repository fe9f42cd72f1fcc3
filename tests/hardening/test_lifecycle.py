"""Start-up and shutdown of the real process (reliability E1, E2, F1).

E1: liveness answers while readiness is still 503 (loading), then readiness turns 200.
E2: the first request after ready pays no lazy start-up: the warm-up ran every encoder a text and a
text+image request call before readiness turned 200 (the model-call counter), and the first request costs
the same model calls as every later one. (Proved by counters: a latency ratio on a shared 2-core machine
measures the neighbours as much as the service.)
F1: on SIGTERM readiness turns 503 first, requests in flight (and queued) finish with 200, new connections
are refused once the drain delay is over, and the process exits 0 within EL_SHUTDOWN__GRACE_S (by its own
clock: past the grace its watchdog logs an error and exits 1).
"""

from __future__ import annotations

import base64
import io
import signal
import threading
import time

import httpx
import pytest
from PIL import Image

from tests.hardening.server import launch, metric, scrape, wait

pytestmark = [pytest.mark.slow, pytest.mark.onnx]



def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 60)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNG_B64 = _png_b64()
BODY = {"mention": "Douglas Adams", "context": "Douglas Adams wrote The Hitchhiker's Guide to the Galaxy.", "top_k": 3}


def test_e1_e2_liveness_first_then_ready_then_warm(settings) -> None:
    server = wait(launch(settings))
    try:
        seen = server.early
        first_ready = next(i for i, (_, ready) in enumerate(seen) if ready == 200)
        assert first_ready > 0, seen  # it was observed not ready at least once
        assert all(live == 200 and ready == 503 for live, ready in seen[:first_ready]), seen
        with server.client() as c:
            at_ready = metric(scrape(c), "el_model_invocations_total")

            def cost(body: dict) -> float:
                before = metric(scrape(c), "el_model_invocations_total")
                assert c.post("/v1/link", json=body).status_code == 200
                return metric(scrape(c), "el_model_invocations_total") - before

            first, again = cost(BODY), cost(BODY)
            with_image = cost({**BODY, "image": PNG_B64})
        assert first == again >= 1, (first, again)  # nothing lazy ran on the first request
        assert at_ready >= first + with_image, (at_ready, first, with_image)  # warm-up covered both paths
    finally:
        server.stop()


def test_f1_sigterm_drains_then_exits_cleanly(settings) -> None:
    delay_s, drain_s, grace_s = 1.5, 1.0, 8.0
    server = wait(launch(settings, EL_STAGE_DELAY_MS=int(delay_s * 1000), EL_ADMISSION__MAX_IN_FLIGHT=2,
                         EL_SHUTDOWN__DRAIN_DELAY_S=drain_s, EL_SHUTDOWN__GRACE_S=grace_s))
    try:
        results: dict[str, int | str] = {}

        def send(name: str, after_s: float = 0.0) -> None:
            time.sleep(after_s)
            try:
                with server.client() as c:
                    results[name] = c.post("/v1/link", json=BODY).status_code
            except httpx.HTTPError as exc:
                results[name] = type(exc).__name__

        # Two in flight and two queued when SIGTERM arrives; one more arrives during the drain delay.
        threads = [threading.Thread(target=send, args=(f"early-{i}",)) for i in range(4)]
        threads.append(threading.Thread(target=send, args=("during-drain", 0.6)))
        for t in threads:
            t.start()
        time.sleep(0.3)
        term_at = time.monotonic()
        server.signal(signal.SIGTERM)
        readiness: list[object] = []
        with httpx.Client(base_url=server.base_url, timeout=1.0) as probe:
            while time.monotonic() - term_at < drain_s * 0.8:
                try:
                    r = probe.get("/readyz")
                    readiness.append((r.status_code, r.json()["status"]))
                except httpx.TransportError as exc:
                    readiness.append(type(exc).__name__)
                time.sleep(0.05)
        code = server.proc.wait(timeout=grace_s + 2)
        exited_after = time.monotonic() - term_at
        for t in threads:
            t.join()
        refused_after = None
        try:
            httpx.get(f"{server.base_url}/healthz", timeout=1.0)
        except httpx.TransportError as exc:
            refused_after = type(exc).__name__
    finally:
        log = server.log()
        server.stop()
    assert readiness and set(readiness) == {(503, "draining")}, readiness
    assert results == {"early-0": 200, "early-1": 200, "early-2": 200, "early-3": 200, "during-drain": 200}, results
    assert code == 0, log[-3000:]
    assert "shutdown took longer than" not in log, log[-3000:]  # its watchdog never fired (code 0 says so too)
    assert exited_after >= drain_s  # it kept accepting for the drain delay first
    assert refused_after == "ConnectError"
    assert "SIGTERM: readiness is 503" in log
