"""`el worker --ray --workers N`: N job workers as Ray actors, each a JobWorker (service/jobs/worker.py) leasing
chunks from the shared store (EL_JOBS__DATABASE_URL: PostgreSQL when the actors sit on several nodes).

Ray restarts an actor that dies (max_restarts=-1: a killed process, a lost node); the restarted worker opens the
store and leases again, and the chunk the dead one held is taken over once its lease runs out.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from service.scale.cluster import connect, pinned_threads, portable
from service.settings import Settings

logger = logging.getLogger(__name__)


def worker_actor_class(settings: Settings) -> Any:
    import ray

    @ray.remote(num_cpus=settings.ray.worker_cpus, max_restarts=-1, max_task_retries=0)
    class JobWorkerActor:
        def __init__(self, settings: Settings) -> None:
            from service.jobs.worker import JobWorker
            from service.logging_setup import configure_logging

            settings = pinned_threads(settings, settings.ray.worker_cpus)
            configure_logging(settings.log_level)
            if settings.ray.shared_index:  # follow the change log of the folder the replicas change
                from service.pipeline.linker import Linker

                self.worker = JobWorker(settings, linker_factory=Linker.for_serving)
            else:
                self.worker = JobWorker(settings)
            self.worker.start()

        def info(self) -> dict[str, Any]:
            import os

            return {**self.worker.stats(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

        def stop(self) -> None:
            self.worker.stop()

    return JobWorkerActor


def start_workers(settings: Settings, n: int, *, name_prefix: str = "el-job-worker") -> list[Any]:
    """N actors (returned as handles); each has started its worker once `info` answers."""
    cls = worker_actor_class(settings)
    shipped = portable(settings)
    return [cls.options(name=f"{name_prefix}-{i}").remote(shipped) for i in range(n)]


def run_ray_workers(settings: Settings, *, workers: int) -> int:
    """Start the actors, keep them while this process lives, stop them on SIGTERM/SIGINT (each commits its chunk)."""
    ray = connect(settings)
    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    actors = start_workers(settings, workers)
    for info in ray.get([a.info.remote() for a in actors]):
        logger.info("job worker actor %s (pid %s) on node %s", info["owner"], info["pid"], info["node_id"])
    while not stop.wait(1.0):
        pass
    ray.get([a.stop.remote() for a in actors], timeout=settings.shutdown.grace_s)
    for a in actors:
        ray.kill(a, no_restart=True)
    if not settings.ray.address:
        ray.shutdown()
    return 0
