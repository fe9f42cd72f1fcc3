"""/metrics across the worker processes of `el serve --workers N` (service/prefork.py).

Each worker writes its registry's exposition to a folder the supervisor made (every PUBLISH_S, at each scrape it
answers, and at exit), and whichever worker answers a scrape merges its own, fresh, with the others' files, every
series labelled `worker="<i>"`: sum over the label for the service's totals (for instance
`sum by (route) (rate(el_requests_total[1m]))`). Families read from a store all workers share (`el_jobs`) come
from the answering worker alone. Another worker's figures are at most PUBLISH_S old. A dead worker's file stays
until its replacement (the same number) overwrites it, with counters from 0 again, which Prometheus reads as a
counter reset on that worker's series.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

PUBLISH_S = 1.0
SHARED = frozenset({"el_jobs"})  # the same store read by every worker: once, not once per worker
_SUFFIX = ".prom"


class MetricsShare:
    def __init__(self, folder: Path, worker: str, registry: CollectorRegistry) -> None:
        self.folder, self.worker, self.registry = folder, worker, registry
        self.path = folder / f"{worker}{_SUFFIX}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.publish()
        self._thread = threading.Thread(target=self._loop, name="el-metrics-share", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(PUBLISH_S):
            try:
                self.publish()
            except OSError:  # the folder went away (the supervisor stopping): nothing to share with
                logger.debug("cannot write %s", self.path, exc_info=True)

    def publish(self) -> bytes:
        """Write this worker's exposition (whole or not at all: a rename); returns it."""
        text = generate_latest(self.registry)
        tmp = self.path.with_name(f".{self.path.name}.{threading.get_native_id()}")
        tmp.write_bytes(text)
        os.replace(tmp, self.path)
        return text

    def render(self) -> bytes:
        """Every worker's series, labelled by worker, in one exposition."""
        own = self.publish()
        texts = {self.worker: own.decode()}
        for f in sorted(self.folder.glob(f"*{_SUFFIX}")):
            worker = f.name.removesuffix(_SUFFIX)
            if worker != self.worker:
                try:
                    texts[worker] = f.read_text()
                except OSError:  # replaced or removed meanwhile
                    continue
        families: dict[str, Metric] = {}
        for worker, text in texts.items():
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError:  # never half written (renamed whole); a foreign file in the folder
                logger.warning("unreadable metrics of worker %s", worker)
                continue
            for fam in parsed:
                if fam.name in SHARED and worker != self.worker:
                    continue
                into = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                label = {} if fam.name in SHARED else {"worker": worker}
                into.samples.extend(s._replace(labels={**s.labels, **label}) for s in fam.samples)
        return generate_latest(_Families(list(families.values())))  # type: ignore[arg-type]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.path.unlink(missing_ok=True)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
