"""The embedded path never loads Ray or psycopg: they come with the `scale` extra and load only when
`el serve --ray`, `el worker --ray` or a postgresql:// job store asks for them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_the_embedded_service_imports_neither_ray_nor_psycopg() -> None:
    code = ("import sys; import service.app, service.cli, service.server, service.jobs.worker, service.jobs.store, "
            "service.scale.serve, service.scale.workers; "
            "loaded = sorted(m for m in ('ray', 'psycopg') if m in sys.modules); print(loaded); sys.exit(bool(loaded))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
