"""`el bench-updates` helpers (service/offline/bench_updates.py) that need no server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from service.offline.bench_updates import cpu_seconds

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 3.0: pass\n"


def test_cpu_seconds_counts_the_descendants(tmp_path: Path) -> None:
    """A server's CPU includes its worker processes' children (the entity decoding process): here a shell whose
    grandchild spins (the inner shell's `; true` keeps it from exec'ing Python in its place)."""
    busy = tmp_path / "busy.py"
    busy.write_text(BUSY)
    shell = subprocess.Popen(["bash", "-c", f"bash -c '{sys.executable} {busy}; true' & wait"])
    try:
        time.sleep(1.5)
        inner = _children(shell.pid)
        assert inner and all(Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"bash") for p in inner)
        used = cpu_seconds(shell.pid)
        assert used >= 0.5, used  # the shells use next to nothing: the grandchild's time is counted
    finally:
        shell.kill()  # the grandchild stops by itself after 3 s of CPU
        shell.wait()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except OSError:  # gone meanwhile
            continue
    return found
