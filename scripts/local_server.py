"""Start the real service on a free loopback port for a benchmark script, and wait until it is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def start_server(store: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`el serve` with its job store at store (plus extra_env); returns the process and its base URL once /readyz
    answers 200. The caller stops the process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # One server process unless the caller's environment or extra_env says otherwise: these scripts measure one.
    env = {"EL_WORKERS": "1"} | os.environ | {"EL_HOST": "127.0.0.1", "EL_PORT": str(port), "EL_JOBS__DIR": str(store),
                        "EL_JOBS__POLL_INTERVAL_S": "0.1", "EL_LOG_LEVEL": "WARNING",
                        "EL_SHUTDOWN__DRAIN_DELAY_S": "0"} | (extra_env or {})
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    give_up = time.monotonic() + 300
    with httpx.Client(base_url=url, timeout=2.0) as c:
        while time.monotonic() < give_up:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                if c.get("/readyz").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready within 300 s")
