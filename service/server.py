"""`el serve`: uvicorn with a readiness drain on SIGTERM and an index reload on SIGHUP.

SIGTERM (what Docker and Kubernetes send): /readyz answers 503 at once, the server keeps accepting for
EL_SHUTDOWN__DRAIN_DELAY_S so that load balancers see it and stop routing here, then uvicorn stops accepting,
lets in-flight requests finish and runs the lifespan shutdown. The process exits 0 within
EL_SHUTDOWN__GRACE_S; a watchdog ends it (status 1) if something hangs past that. A second SIGTERM skips
the rest of the drain delay. SIGINT (Ctrl-C) keeps uvicorn's behaviour: stop now, twice to force.

SIGHUP reloads the configured EL_INDEX__DIR (as POST /v1/admin/reload does) without dropping a request.

Signal handlers only set flags: they interrupt arbitrary code, so taking a lock there (logging, metrics,
starting a thread) could deadlock. The work happens in `on_tick`, which uvicorn runs every 0.1 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from service.errors import ELError
from service.settings import Settings

if TYPE_CHECKING:  # the state's modules load torch and FAISS: not in a supervisor of worker processes
    from service.accept_balance import BalancedListener, ConnectionBoard
    from service.state import AppState

logger = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, board: ConnectionBoard | None = None) -> None:
        """board: one of several worker processes on a shared socket, which accepts through a BalancedListener
        (service/accept_balance.py) instead of the event loop's server."""
        super().__init__(config)
        self.state = state
        self.board = board
        self.listener: BalancedListener | None = None
        self.grace_s = state.settings.shutdown.grace_s
        self.drain_delay_s = state.settings.shutdown.drain_delay_s
        self._term_at: float | None = None  # monotonic time of the first SIGTERM
        self._stop_at: float | None = None  # when to stop accepting
        self._drain_noted = False
        self._reload_wanted = False
        self._tasks: set[asyncio.Task] = set()

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():  # SIGINT, SIGTERM -> handle_exit
            if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
                yield
                return
            previous = signal.signal(signal.SIGHUP, self._on_sighup)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
            return
        # Not passed to uvicorn: it would re-raise SIGTERM after the shutdown and the exit status would say
        # "killed"; a drained shutdown is a clean exit.
        now = time.monotonic()
        if self._term_at is None:
            self._term_at = now
            self._stop_at = now + self.drain_delay_s
        else:
            self._stop_at = now

    def _on_sighup(self, sig: int, frame: FrameType | None) -> None:
        self._reload_wanted = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.board is None or not sockets:
            await super().startup(sockets=sockets)
            return
        from service.accept_balance import BalancedListener

        await super().startup(sockets=[])  # the lifespan and the server's state; no event-loop server
        if self.should_exit:
            return
        config = self.config

        def protocol() -> asyncio.Protocol:  # as uvicorn's own startup makes them
            return config.http_protocol_class(config=config, server_state=self.server_state,  # type: ignore[call-arg]
                                              app_state=self.lifespan.state)

        self.listener = BalancedListener(sockets[0], protocol, self.board)
        self.listener.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.listener is not None:
            self.listener.stop()  # stop accepting first, as uvicorn closes its servers first
        await super().shutdown(sockets=sockets)

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and not self._drain_noted:
            self._drain_noted = True
            self.state.metrics.draining.set(1)
            self.state.metrics.ready.set(0)
            if self._term_at is not None:
                logger.info("SIGTERM: readiness is 503; accepting for %.1f s more, then finishing in-flight "
                            "requests (exit within %.1f s)", self.drain_delay_s, self.grace_s)
                self._start_watchdog(self._term_at + self.grace_s - time.monotonic())
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.should_exit = True
        if self._reload_wanted:
            self._reload_wanted = False
            task = asyncio.create_task(self._reload())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await super().on_tick(counter)

    async def _reload(self) -> None:
        logger.info("SIGHUP: reloading the index from %s", self.state.settings.index.dir)
        try:
            from service.reloading import reload_index

            out = await reload_index(self.state)
        except ELError as exc:
            logger.error("SIGHUP reload failed: %s", exc.message)
            return
        logger.info("SIGHUP: now serving index %s (was %s)", out.index_version, out.previous_version)

    def _start_watchdog(self, delay_s: float) -> None:
        # Last resort for a hung clean-up (a stuck worker thread): the grace period is a promise to the
        # orchestrator, which would SIGKILL us anyway.
        timer = threading.Timer(max(delay_s, 0.0), _overran, args=(self.grace_s,))
        timer.daemon = True
        timer.start()


def _overran(grace_s: float) -> None:
    logger.error("shutdown took longer than EL_SHUTDOWN__GRACE_S=%.1f s; exiting now", grace_s)
    logging.shutdown()
    os._exit(1)


def server_config(settings: Settings, app: object) -> uvicorn.Config:
    sd = settings.shutdown
    # What is left of the grace period after the drain delay goes to in-flight requests; 1 s is kept
    # for the lifespan shutdown and interpreter exit.
    in_flight_s = max(sd.grace_s - sd.drain_delay_s - 1.0, 0.5)
    return uvicorn.Config(app, host=settings.host, port=settings.port,  # type: ignore[arg-type]
                          log_level=settings.log_level.lower(), timeout_graceful_shutdown=in_flight_s)


def serve(settings: Settings, app_factory: Callable[..., FastAPI]) -> int:
    """Run the app until SIGTERM/SIGINT; returns the process exit status. With EL_WORKERS > 1 (or auto, on a
    machine with more than one CPU to use), that many processes of it (service/prefork.py)."""
    from service.prefork import serve_workers, worker_count

    if (workers := worker_count(settings)) > 1:
        return serve_workers(settings, app_factory, workers)
    app = app_factory(settings)
    server = GracefulServer(server_config(settings, app), app.state.el)
    try:
        server.run()
    except KeyboardInterrupt:  # SIGINT re-raised by uvicorn after its shutdown
        return 130
    return 0
