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


SPINNING_SERVER = """
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    def log_message(self, *a): pass
    def _answer(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        t = time.process_time()
        while time.process_time() - t < 0.004: pass  # 4 ms of CPU per request
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"{}")
    do_GET = do_POST = _answer
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def test_idle_phase_measures_the_cores_the_server_and_the_clients_keep_busy() -> None:
    """A fake server (named so: a stdlib HTTP server spending 4 ms of CPU per request, one request at a time) under
    the bench's closed-loop link clients: most of its wall time is that CPU, so it keeps close to one core busy, and
    the clients' share is counted apart."""
    from service.offline.bench_updates import idle_phase

    server = subprocess.Popen([sys.executable, "-c", SPINNING_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        latencies, cores = idle_phase(f"http://127.0.0.1:{port}", [{"mention": "x"}] * 200, 1, server.pid)
        assert len(latencies) == 200 and min(latencies) >= 4.0
        assert 0.3 <= cores["server_cores"] <= 1.1, cores
        assert 0.0 < cores["client_cores"] < cores["server_cores"], cores
    finally:
        server.kill()
        server.wait()
