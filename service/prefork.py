"""`el serve` with EL_WORKERS > 1: that many server processes answering on one listening socket. The default,
EL_WORKERS=auto, is one per usable CPU within limits (`worker_count`), so a 2-core machine runs two.

Why: in one process the event loop (HTTP parsing, validation, answers) and the pipeline's Python parts share one
interpreter lock, and under load the loop waits for it while requests queue in the socket; batches then stay
small (6-9 at concurrency 32), and a small batch costs up to 1.6x more CPU per mention than one of 64. Each worker
process has its own lock and its own micro-batcher. `el bench --http-workers 1 2` measures the difference (README:
"Worker processes").

Each worker is the single-process server (service/server.py: the same app, drain on SIGTERM, index reload on
SIGHUP), on the socket this process opened. What differs:
- entity changes work as in one process, through any worker: each holds the index folder's change log
  (kg_index/changelog.py), appends under the file's lock after reading what the others appended, and before each
  batch takes in what they logged (two stat calls when nothing changed), so the next link after an acknowledged
  change sees it whichever worker answers. One compaction runs at a time; the other workers load the compacted
  folder when they see it swapped in (their links wait for that load, about 1.5 s for 41k entities);
- /metrics answers for all workers, each series labelled `worker` (service/metrics_share.py); POST
  /v1/admin/reload reloads the worker it reaches and, through this process, the others (service/peers.py); it
  reloads only the configured EL_INDEX__DIR (another folder for one worker alone is refused: 409); admission
  limits and the micro-batcher are per process; every answer names its worker (`X-EL-Worker`);
- jobs: every worker runs a job runner on the one job store (leases share the chunks, as `el worker` does);
- a worker loads its index before it takes connections, so one started again leaves them to the others meanwhile;
- the workers take turns by the connections they hold (service/accept_balance.py), so a client's few keep-alive
  connections reach every worker.

This process only supervises: it forwards SIGTERM, SIGINT and SIGHUP to the workers (which run in their own
process group, so a terminal's Ctrl-C reaches them once, through here), starts a worker again when one dies, and
gives up (stopping the rest, exit status 1) when one dies again and again within a minute, which is how a failed
startup looks. A worker whose supervisor is gone (SIGKILL) stops itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from service.accept_balance import create_board, forget
from service.peers import Peers, reload_requests
from service.settings import Settings

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often the supervisor looks at its workers
RESTARTS_PER_MINUTE = 3  # more deaths than this of one worker within a minute: stop everything


AUTO_MAX_WORKERS = 4  # EL_WORKERS=auto never starts more (each costs its own encoders and index in memory)
AUTO_BYTES_PER_WORKER = 2 << 30  # ... nor more than one per this much available memory (41k index: ~1.5 GB each)


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity, cut to the container's CPU quota (cgroup v2 cpu.max or v1
    cpu.cfs_quota_us), whole CPUs only (a 1.5-CPU quota counts 1)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for quota_file, period_file in ((cgroup / "cpu.max", None),
                                    (cgroup / "cpu" / "cpu.cfs_quota_us", cgroup / "cpu" / "cpu.cfs_period_us")):
        try:
            fields = quota_file.read_text().split()
            quota, period = fields[0], (fields[1] if period_file is None else period_file.read_text().strip())
            if quota not in ("max", "-1"):
                n = min(n, int(quota) // int(period))
        except (OSError, ValueError, IndexError):
            continue
        break
    return max(1, n)


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes (None where the kernel does not say)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def worker_count(settings: Settings) -> int:
    """EL_WORKERS as a number: itself, or for `auto` one process per usable CPU, at most AUTO_MAX_WORKERS and one
    per AUTO_BYTES_PER_WORKER of available memory, and 1 when the encoders run on CUDA (one process holds the
    GPU; several were never measured there). Why more than one on a CPU: in one process the event loop and the
    pipeline's Python parts share one interpreter lock, which holds a server to about 1.7 of 2 cores."""
    if settings.workers != "auto":
        return settings.workers
    from models.runtime import picks_cuda

    if picks_cuda(settings.encoder.device):
        n, why = 1, "the encoders run on CUDA"
    else:
        cpus, mem = usable_cpus(), available_memory()
        by_memory = max(1, mem // AUTO_BYTES_PER_WORKER) if mem is not None else AUTO_MAX_WORKERS
        n = min(cpus, AUTO_MAX_WORKERS, by_memory)
        why = f"{cpus} usable CPUs" + (f", {mem / (1 << 30):.1f} GiB available" if mem is not None else "")
    logger.info("EL_WORKERS=auto: %d server process%s (%s)", n, "" if n == 1 else "es", why)
    return n


def per_worker(settings: Settings, workers: int) -> Settings:
    """The settings of one of `workers` processes: the defaults meant for a process that has the machine to itself
    give way where not set explicitly. One batch at a time (EL_BATCHING__MAX_CONCURRENT), one ONNX Runtime thread
    (EL_ENCODER__INTRA_OP_THREADS), no halves (EL_BATCHING__SPLIT_MIN): the other processes use the other cores.
    (2 workers on 2 cores with every default kept answered fewer requests/s at concurrency 32 than one process.)"""
    batching, encoder = settings.batching, settings.encoder
    b = {k: v for k, v in (("max_concurrent", max(1, batching.max_concurrent // workers)), ("split_min", 0))
         if k not in batching.model_fields_set}
    e = {"intra_op_threads": 1} if "intra_op_threads" not in encoder.model_fields_set else {}
    return settings.model_copy(update={"batching": batching.model_copy(update=b),
                                       "encoder": encoder.model_copy(update=e)})


def _export(settings: Settings) -> None:
    from service.encoders import export_encoders

    export_encoders(settings)


def _export_once(settings: Settings) -> None:
    """Export the encoders (where not done yet) in a process of its own: done here, the ONNX sessions it loads to
    check them and their libraries would stay in the supervisor for its whole life (about 350 MB, measured)."""
    p = multiprocessing.get_context("spawn").Process(target=_export, args=(settings,), name="el-export")
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"exporting the encoders failed (exit status {p.exitcode}; its error is above)")


def serve_workers(settings: Settings, app_factory: Callable[..., Any], workers: int) -> int:
    """Run `workers` server processes on EL_HOST:EL_PORT until SIGTERM/SIGINT; returns the exit status."""
    settings = per_worker(settings, workers)
    _export_once(settings)  # before the workers: starting together, they must not export the same files at once
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.create_server((settings.host, settings.port), family=family, backlog=2048)
    shared = Path(tempfile.mkdtemp(prefix="el-workers-"))  # the workers' metrics and reload requests (peers.py)
    board = create_board(shared, workers)  # how many connections each holds (accept_balance.py)
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    deaths: dict[int, list[float]] = {i: [] for i in range(workers)}
    stop = threading.Event()
    forward: list[int] = []  # signals to pass on (set by the handler, sent by the loop)

    def start(i: int) -> None:
        p = ctx.Process(target=_worker_main, args=(settings, app_factory, sock, i, os.getpid(), shared),
                        name=f"el-serve-{i}", daemon=False)
        p.start()
        procs[i] = p

    def on_signal(sig: int, frame: FrameType | None) -> None:
        forward.append(sig)
        if sig != signal.SIGHUP:
            stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    status = 0
    try:
        for i in range(workers):
            start(i)
        logger.info("serving on http://%s:%d with %d worker processes (%s)", settings.host, settings.port, workers,
                    ", ".join(str(p.pid) for p in procs.values()))
        while not stop.is_set():
            _send(procs, forward)
            for asking in reload_requests(shared):  # POST /v1/admin/reload reached one worker: reload the others
                logger.info("worker %s reloaded its index: SIGHUP to the others", asking)
                _send({i: p for i, p in procs.items() if str(i) != asking}, [signal.SIGHUP])
            for i, p in list(procs.items()):
                if p.exitcode is None:
                    continue
                now = time.monotonic()
                deaths[i] = [t for t in deaths[i] if now - t < 60.0] + [now]
                if len(deaths[i]) > RESTARTS_PER_MINUTE:
                    logger.error("worker %d exited with status %s %d times within a minute; stopping", i,
                                 p.exitcode, len(deaths[i]))
                    status = 1
                    stop.set()
                    forward.append(signal.SIGTERM)
                    break
                logger.error("worker %d (pid %s) exited with status %s; starting it again", i, p.pid, p.exitcode)
                forget(board, i)
                start(i)
            stop.wait(POLL_S)
        _send(procs, forward)
        grace = settings.shutdown.grace_s + 5.0
        deadline = time.monotonic() + grace
        for p in procs.values():
            p.join(max(deadline - time.monotonic(), 0.1))
        for i, p in procs.items():
            if p.exitcode is None:
                logger.error("worker %d did not stop within %.0f s; killing it", i, grace)
                p.kill()
                p.join(5.0)
                status = 1
            elif p.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT) and status == 0:  # stopped as asked
                status = 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
        shutil.rmtree(shared, ignore_errors=True)
    return status


def _send(procs: dict[int, multiprocessing.process.BaseProcess], forward: list[int]) -> None:
    while forward:
        sig = forward.pop(0)
        for p in procs.values():
            if p.exitcode is None and p.pid is not None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass


def _worker_main(settings: Settings, app_factory: Callable[..., Any], sock: socket.socket, worker: int,
                 supervisor: int, shared: Path) -> None:
    """One worker: the single-process server on the inherited socket."""
    from service.accept_balance import BOARD_NAME, ConnectionBoard
    from service.logging_setup import configure_logging
    from service.middleware import AnswerHeader
    from service.server import GracefulServer, server_config

    os.setpgrp()  # signals come through the supervisor only (a terminal's Ctrl-C would reach us twice)
    # Until the server's own handler is in place: a reload asked for meanwhile is moot (the index is being loaded
    # from the folder now), and SIGHUP's default action would end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(settings.log_level)
    # Loaded before the socket is served: a worker started again takes no connection (to answer 503 "loading")
    # while the others are ready.
    app = app_factory(settings, serve_when_loaded=True, peers=Peers(shared, str(worker)))
    server = GracefulServer(server_config(settings, AnswerHeader(app, "x-el-worker", str(worker))), app.state.el,
                            board=ConnectionBoard(shared / BOARD_NAME, worker))
    threading.Thread(target=_watch_supervisor, args=(supervisor,), daemon=True, name="el-supervisor-watch").start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # SIGINT, passed on by the supervisor: stopped as asked
        pass


def _watch_supervisor(supervisor: int) -> None:
    """Stop (as on SIGTERM) once the supervisor is gone: nobody would stop or replace this worker any more."""
    while os.getppid() == supervisor:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
