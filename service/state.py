"""What the app holds between requests; routes reach it through `request.app.state.el`."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.admission import Admission
from service.batcher import MicroBatcher
from service.decode_process import DecodeProcess
from service.errors import NotReady
from service.jobs.manager import JobManager
from service.metrics import Metrics
from service.peers import Peers
from service.pipeline.linker import Linker
from service.settings import Settings
from service.updates import EntityUpdater


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    admission: Admission
    batcher: MicroBatcher
    linker: Linker | None = None
    ready: bool = False
    draining: bool = False
    reloading: bool = False
    load_error: str | None = None
    extras: dict = field(default_factory=dict)
    jobs: JobManager | None = None
    updater: EntityUpdater = None  # type: ignore[assignment]  # set by create_app
    entity_decoding: DecodeProcess = None  # type: ignore[assignment]  # set by create_app
    peers: Peers | None = None  # set in a worker process of `el serve --workers N`

    def require_linker(self) -> Linker:
        if self.linker is None or not self.ready:
            # The load error names server paths: it goes to the log and /readyz, not into every client's 503.
            msg = "model or index failed to load" if self.load_error else "model and index are still loading"
            raise NotReady(msg, headers={"Retry-After": "5"})
        return self.linker
