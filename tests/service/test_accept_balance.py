"""service/accept_balance.py: workers on one listening socket take turns by the connections they hold. Two
listeners in one event loop here (each on its own descriptor of the shared socket, as two processes have), with a
plain echo protocol; the real server's workers: tests/service/test_prefork.py."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from service.accept_balance import BalancedListener, ConnectionBoard, create_board, forget


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def _loops() -> list:
    """The default loop and uvloop (which the server runs under uvicorn when it is installed)."""
    try:
        import uvloop
    except ImportError:
        return [asyncio.new_event_loop]
    return [asyncio.new_event_loop, uvloop.new_event_loop]


def _run(coro, loop_factory) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)


async def _settle(cond, timeout_s: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.005)
    return cond()


@pytest.mark.parametrize("loop_factory", _loops())
def test_connections_alternate_between_workers_and_are_counted_out(tmp_path: Path, loop_factory) -> None:
    board_path = create_board(tmp_path, 2)
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = server.getsockname()[1]

    async def main() -> None:
        listeners = [BalancedListener(s, Echo, ConnectionBoard(board_path, i))
                     for i, s in enumerate((server, server.dup()))]
        for lst in listeners:
            lst.start()
        clients = []
        for k in range(6):  # one at a time: each lands where fewer connections are held
            clients.append(await asyncio.open_connection("127.0.0.1", port))
            assert await _settle(lambda k=k: sum(lst.held for lst in listeners) == k + 1)
            assert abs(listeners[0].held - listeners[1].held) <= 1, [lst.held for lst in listeners]
        reader, writer = clients[0]
        writer.write(b"ping")  # a connection taken this way is served by the protocol as usual
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        board = ConnectionBoard(board_path, 0)
        assert board.fewest_elsewhere() == listeners[1].held == 3  # the board shows what each holds
        for _, w in clients:
            w.close()
        assert await _settle(lambda: [lst.held for lst in listeners] == [0, 0])  # counted out when lost
        assert board.fewest_elsewhere() == 0
        listeners[1].stop()  # a worker that stops listening leaves the board: the other never defers to it
        assert board.fewest_elsewhere() is None
        more = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        assert await _settle(lambda: listeners[0].held == 3)
        for _, w in more:
            w.close()
        listeners[0].stop()

    _run(main(), loop_factory)
    server.close()


@pytest.mark.parametrize("loop_factory", _loops())
def test_a_worker_that_does_not_accept_delays_a_connection_only_briefly(tmp_path: Path, loop_factory) -> None:
    """The board says another worker holds fewer connections, but it never accepts (busy, stuck, or killed before
    the supervisor saw it): the fuller one takes the connection after DEFER_S (20 ms)."""
    board_path = create_board(tmp_path, 2)
    ConnectionBoard(board_path, 1).publish(0)  # a worker that claims to listen and holds nothing
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = server.getsockname()[1]

    async def main() -> None:
        lst = BalancedListener(server, Echo, ConnectionBoard(board_path, 0))
        lst.start()
        first = await asyncio.open_connection("127.0.0.1", port)  # 0 against 0: taken at once
        assert await _settle(lambda: lst.held == 1)
        second = await asyncio.open_connection("127.0.0.1", port)  # 1 against 0: left to the other, then taken
        assert await _settle(lambda: lst.held == 2, 1.0) and lst.deferred >= 1
        for _, w in (first, second):
            w.close()
        lst.stop()

    _run(main(), loop_factory)
    forget(board_path, 1)  # what the supervisor does when it sees a worker gone
    assert ConnectionBoard(board_path, 0).fewest_elsewhere() is None
    server.close()
