"""Spread the connections of `el serve`'s worker processes evenly (service/prefork.py).

The workers share one listening socket, and whichever wakes first accepts a connection: two keep-alive connections
opened by one client landed in the same process about a third of the time (40 trials, *exploratory*), and then that
client's requests queue behind each other in one process while the other idles (half the throughput; link p50 14
ms against 7.5 in `el bench-updates`' idle phases), and a change stream per process does not reach both. So each
worker accepts in Python instead of in the event loop's C accept loop: it publishes how many connections it holds on
a board every worker reads (a small shared file: one 64-bit slot per worker, -1 while a worker is not listening), and
a worker that holds more than another listening one lets a new connection wait, looking again every `RECHECK_S`,
for the other to take it; if it is still there after `DEFER_S` (the other is busy, stuck or gone), it takes it.
One connection per wake-up, so that every accept looks at the board again.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import select
import socket
import struct
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

BOARD_NAME = "connections.board"
NOT_LISTENING = -1
# How long a fuller worker leaves a new connection to the others: the emptier one's event loop may wait for its
# interpreter lock behind a batch's Python for several ms (5 ms let 3 of 4 connections into one process on a loaded
# CI machine), and a connection comes once for many requests.
DEFER_S = 0.02
RECHECK_S = 0.001  # how often a deferring worker looks whether the connection is still waiting
_SLOT = struct.Struct("q")


def create_board(folder: Path, workers: int) -> Path:
    """The board for `workers` workers (the supervisor's, before it starts them): every slot NOT_LISTENING."""
    path = folder / BOARD_NAME
    path.write_bytes(_SLOT.pack(NOT_LISTENING) * workers)
    return path


class ConnectionBoard:
    """One worker's view of the board: it writes its own slot and reads the others' (aligned 8-byte words: a
    reader sees a whole old or new value; a stale one costs at most DEFER_S on one connection)."""

    def __init__(self, path: Path, me: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.me = me
        self.workers = len(self._map) // _SLOT.size

    def publish(self, connections: int) -> None:
        _SLOT.pack_into(self._map, self.me * _SLOT.size, connections)

    def fewest_elsewhere(self) -> int | None:
        """The fewest connections held by another listening worker (None: no other is listening)."""
        others = [_SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i in range(self.workers) if i != self.me]
        listening = [n for n in others if n != NOT_LISTENING]
        return min(listening) if listening else None

    def close(self) -> None:
        self.publish(NOT_LISTENING)
        self._map.close()


def forget(path: Path, worker: int) -> None:
    """Mark a worker that exited as not listening (the supervisor's, when it sees it gone)."""
    try:
        with path.open("r+b") as f:
            f.seek(worker * _SLOT.size)
            f.write(_SLOT.pack(NOT_LISTENING))
    except OSError:  # the folder is being removed: the server is stopping
        pass


class BalancedListener:
    """Accepts from the shared socket for `protocol_factory` (uvicorn's), deferring to emptier workers."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol],
                 board: ConnectionBoard) -> None:
        self.sock = sock
        self.factory = protocol_factory
        self.board = board
        self.held = 0  # connections accepted and not yet lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting_since: float | None = None  # when this worker first left the waiting connection to others
        self._resume: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()  # accepted connections on their way to uvicorn
        self.deferred = 0  # times a waiting connection was left to the others (a count for tests and logs)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.board.publish(self.held)
        self._loop.add_reader(self.sock.fileno(), self._ready)

    def stop(self) -> None:
        """Stop accepting (connections already taken go on) and leave the board."""
        if self._loop is None:
            return
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self.sock.fileno())
        self._loop = None
        self.board.close()

    def _count(self, delta: int) -> None:
        self.held += delta
        if self._loop is not None:
            self.board.publish(self.held)

    def _ready(self) -> None:
        loop = self._loop
        if loop is None:
            return
        fewest = self.board.fewest_elsewhere()
        if fewest is not None and self.held > fewest:
            now = loop.time()
            self._waiting_since = self._waiting_since or now
            if now - self._waiting_since < DEFER_S:  # look again shortly: taken by then, or still left to us?
                self.deferred += 1
                self._pause(RECHECK_S)
                return
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):  # another worker took it
            self._waiting_since = None
            return
        except OSError as exc:  # out of file descriptors, say: the connection waits; try again shortly
            logger.warning("accepting a connection failed: %s", exc)
            self._pause(0.1)
            return
        self._waiting_since = None
        self._count(+1)
        task = loop.create_task(self._serve(loop, conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pause(self, seconds: float) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self.sock.fileno())
        self._resume = self._loop.call_later(seconds, self._again)

    def _again(self) -> None:
        self._resume = None
        if self._loop is None:
            return
        waiting = select.poll()  # poll, not select: no limit on the descriptor's number
        waiting.register(self.sock, select.POLLIN)
        if not waiting.poll(0):  # the waiting connection went to another worker
            self._waiting_since = None
        self._loop.add_reader(self.sock.fileno(), self._ready)

    def _protocol(self) -> asyncio.Protocol:
        """uvicorn's protocol, counted out when its connection is lost."""
        protocol = self.factory()
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            self._count(-1)
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol

    async def _serve(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the event loop's own accept does
        try:
            await loop.connect_accepted_socket(self._protocol, conn)
        except OSError as exc:  # the client left before we got to it: no protocol, nothing lost to count
            logger.debug("an accepted connection failed: %s", exc)
            conn.close()
            self._count(-1)
