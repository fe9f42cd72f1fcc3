"""Prometheus metrics, one registry per app (tests build many apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kg_index.exact import SEARCH_COUNTS
from service.metrics_share import MetricsShare
from service.pipeline.decode import DECODE_COUNTS
from service.pipeline.types import STAGES, OTStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.share: MetricsShare | None = None
        r = self.registry
        self.requests = Counter("el_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("el_request_latency_seconds", "HTTP latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("el_stage_latency_seconds", "Pipeline stage latency per batch: encode, retrieve, rerank "
                               "(total) and its parts rerank_gather, rerank_sinkhorn, rerank_pool, rerank_strings, "
                               "rerank_kg; respond; total", ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        for stage in STAGES:  # every stage listed from the first scrape, at 0 until a batch has run
            self.stage.labels(stage)
        self.sinkhorn_iterations = Histogram("el_sinkhorn_iterations", "Sinkhorn iterations per rerank call",
                                             buckets=(1, 2, 5, 10, 20, 30, 50, 100, 200, 500), registry=r)
        self.sinkhorn_problems = Counter("el_sinkhorn_problems", "OT problems solved", ["converged"], registry=r)
        self.sinkhorn_marginal_error = Gauge("el_sinkhorn_marginal_error", "Max marginal error of the last call", registry=r)
        self.queue_depth = Gauge("el_queue_depth", "Requests waiting for a model slot", registry=r)
        self.in_flight = Gauge("el_in_flight", "Requests running in the pipeline", registry=r)
        self.rejections = Counter("el_rejections", "Requests refused before the model", ["reason"], registry=r)
        self.mentions = Counter("el_mentions_linked", "Mentions linked", ["source"], registry=r)
        self.ready = Gauge("el_ready", "1 when the model and index are loaded and warm", registry=r)
        self.draining = Gauge("el_draining", "1 once shutdown has begun (readiness answers 503)", registry=r)
        self.index_reloads = Counter("el_index_reloads", "Index reloads (admin route or SIGHUP)", ["outcome"], registry=r)
        self.auth_failures = Counter("el_auth_failures", "Requests refused for a missing or wrong API key", registry=r)
        self.entity_changes = Counter("el_entity_changes", "Entity changes applied (logged, then served)", ["op"],
                                      registry=r)
        self.change_log = Gauge("el_change_log_changes", "Changes in the index folder's change log (since its last "
                                "build or compaction)", registry=r)
        self.compactions = Counter("el_index_compactions", "Change-log compactions (outcome ok, failed, busy: another "
                                   "server process was compacting the folder)", ["outcome"], registry=r)
        self.batch_size = Histogram("el_batch_size", "Mentions per link_batch call of the micro-batcher", ["kind"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_queue_wait = Histogram("el_batch_queue_wait_seconds", "Time a request (or job item) waited in the "
                                          "micro-batcher before its batch started", ["kind"],
                                          buckets=(0.0005,) + _LATENCY_BUCKETS, registry=r)
        self.job_items = Counter("el_job_items", "Job items finished, by outcome (ok or error)", ["outcome"], registry=r)
        for outcome in ("ok", "error"):
            self.job_items.labels(outcome)
        r.register(_DecodeCollector())
        r.register(_SearchCollector())

    def track_model_invocations(self, read: Callable[[], int]) -> None:
        """Expose `el_model_invocations_total`: real encoder calls, read from the runtime at scrape time."""
        self.registry.register(_InvocationCollector(read))

    def track_job_states(self, counts: Callable[[], dict[str, int]]) -> None:
        """Expose `el_jobs{state}`: jobs per state, read from the job store at scrape time (exact across restarts)."""
        self.registry.register(_JobStateCollector(counts))

    def observe_batch(self, timings_ms: dict[str, float], ot_stats: list[OTStats]) -> None:
        for stage, ms in timings_ms.items():
            self.stage.labels(stage).observe(ms / 1000)
        for st in ot_stats:
            self.sinkhorn_iterations.observe(st.iterations)
            self.sinkhorn_problems.labels("true").inc(st.converged)
            self.sinkhorn_problems.labels("false").inc(st.problems - st.converged)
            self.sinkhorn_marginal_error.set(st.max_marginal_error)

    def render(self) -> bytes:
        """This process's metrics; with worker processes (share_with), every worker's, labelled by worker."""
        return self.share.render() if self.share is not None else generate_latest(self.registry)

    def share_with(self, folder: Path, worker: str) -> MetricsShare:
        """Publish this registry to the workers' folder and render all of theirs (service/metrics_share.py)."""
        self.share = MetricsShare(folder, worker, self.registry)
        return self.share


class _InvocationCollector(Collector):
    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("el_model_invocations", "Real encoder (ONNX) calls; rejected or dropped requests "
                                  "never add to it", value=self.read())


class _JobStateCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def describe(self) -> Iterator[Metric]:  # lets register() skip a store read
        yield GaugeMetricFamily("el_jobs", "Jobs per state in the job store", labels=["state"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("el_jobs", "Jobs per state in the job store", labels=["state"])
        for state, n in self.counts().items():
            family.add_metric([state], n)
        yield family


class _DecodeCollector(Collector):
    """`el_image_*`: this process's decoding work, read at scrape time (a refused image adds nothing)."""

    def collect(self) -> Iterator[Metric]:
        counts = DECODE_COUNTS.snapshot()
        yield CounterMetricFamily("el_image_base64_bytes_decoded", "Base64 image characters decoded",
                                  value=counts.base64_bytes)
        yield CounterMetricFamily("el_image_decodes", "Image pixel decodes started (every header check passed)",
                                  value=counts.image_decodes)
        yield CounterMetricFamily("el_image_pixels_decoded", "Pixels produced by finished image decodes",
                                  value=counts.pixels)


class _SearchCollector(Collector):
    """`el_exact_search_*`: which kernel answered this process's exact (Flat) searches, and how many queries a
    shortlist's rounding bound sent back to fp32 (kg_index/exact.py SEARCH_COUNTS), read at scrape time."""

    def collect(self) -> Iterator[Metric]:
        queries, researched = SEARCH_COUNTS.snapshot()
        family = CounterMetricFamily("el_exact_search_queries", "Queries answered by exact search of a Flat index, "
                                     "by kernel (kg_index/exact.py SearchPlan)", labels=["kernel"])
        for kernel, n in queries.items():
            family.add_metric([kernel], n)
        yield family
        yield CounterMetricFamily("el_exact_search_fp32_researches", "Queries a shortlist's rounding bound sent "
                                  "back to the fp32 search (the answer stays exact; expected: almost none)",
                                  value=researched)
