"""What worker processes share: /metrics (service/metrics_share.py, two registries standing for two workers) and
reload requests (service/peers.py)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from service.metrics_share import MetricsShare


class _Jobs:
    def collect(self):
        family = GaugeMetricFamily("el_jobs", "Jobs per state", labels=["state"])
        family.add_metric(["queued"], 3)
        yield family


def _worker(folder: Path, name: str, requests: int) -> MetricsShare:
    r = CollectorRegistry()
    Counter("el_requests", "HTTP requests", ["route"], registry=r).labels("/v1/link").inc(requests)
    Histogram("el_batch_size", "Mentions per batch", buckets=(1, 8, 64), registry=r).observe(requests)
    r.register(_Jobs())
    return MetricsShare(folder, name, r)


def _samples(text: bytes) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_every_worker_is_in_the_answer_labelled_and_shared_families_once(tmp_path: Path) -> None:
    a, b = _worker(tmp_path, "0", 5), _worker(tmp_path, "1", 7)
    b.publish()
    got = _samples(a.render())
    link = (("route", "/v1/link"),)
    assert got[("el_requests_total", (*link, ("worker", "0")))] == 5
    assert got[("el_requests_total", (*link, ("worker", "1")))] == 7
    assert got[("el_batch_size_count", (("worker", "1"),))] == 1
    assert got[("el_batch_size_bucket", (("le", "8.0"), ("worker", "1")))] == 1
    assert [k for k in got if k[0] == "el_jobs"] == [("el_jobs", (("state", "queued"),))]  # not once per worker
    b.close()  # a worker that stops takes its file with it
    assert not (tmp_path / "1.prom").exists()
    assert not any(dict(k[1]).get("worker") == "1" for k in _samples(a.render()))
    (tmp_path / "junk.prom").write_text("this is { not an exposition\n")
    assert _samples(a.render())[("el_requests_total", (*link, ("worker", "0")))] == 5  # a bad file is skipped
    a.close()


def test_a_reload_request_names_the_worker_that_asked(tmp_path: Path) -> None:
    from service.peers import Peers, reload_requests

    Peers(tmp_path, "1").ask_others_to_reload()
    Peers(tmp_path, "0").ask_others_to_reload()
    assert sorted(reload_requests(tmp_path)) == ["0", "1"]
    assert reload_requests(tmp_path) == []  # taken once
    assert not list(tmp_path.iterdir())  # no temporary file left
