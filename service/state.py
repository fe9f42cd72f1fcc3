"""What the app holds between requests; routes reach it through `request.app.state.el`."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.admission import Admission
from service.errors import NotReady
from service.metrics import Metrics
from service.pipeline.linker import Linker
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    admission: Admission
    linker: Linker | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    extras: dict = field(default_factory=dict)

    def require_linker(self) -> Linker:
        if self.linker is None or not self.ready:
            raise NotReady(self.load_error or "model and index are still loading", headers={"Retry-After": "5"})
        return self.linker
