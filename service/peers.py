"""What a worker process of `el serve --workers N` shares with the others (service/prefork.py): a folder the
supervisor made, holding each worker's metrics (service/metrics_share.py) and the requests workers leave for the
supervisor.

A reload asked of one worker (POST /v1/admin/reload) must reach them all: the worker reloads itself, then leaves a
`<worker>.<nonce>.reload` file; the supervisor, which looks at the folder every POLL_S, sends SIGHUP to every other
worker (each then reloads the configured folder, as on a SIGHUP to the supervisor) and removes the file.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

RELOAD_SUFFIX = ".reload"


@dataclass(frozen=True)
class Peers:
    folder: Path
    worker: str

    def ask_others_to_reload(self) -> None:
        tmp = self.folder / f".{self.worker}.{uuid.uuid4().hex}"
        tmp.write_bytes(b"")
        os.replace(tmp, tmp.with_name(f"{self.worker}.{uuid.uuid4().hex}{RELOAD_SUFFIX}"))


def reload_requests(folder: Path) -> list[str]:
    """The workers that asked the others to reload since the last call (their requests are removed)."""
    out = []
    for f in sorted(folder.glob(f"*{RELOAD_SUFFIX}")):
        out.append(f.name.split(".", 1)[0])
        f.unlink(missing_ok=True)
    return out
