"""The serving loop's listener: every connection waiting is taken in one turn of the loop."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from gateway.listen import SHARED_BATCH, GatewayLoop, bind

WAITING = 40


class Counted(asyncio.Protocol):
    made: list[asyncio.BaseTransport]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)


@pytest.fixture
def loop() -> Iterator[GatewayLoop]:
    loop = GatewayLoop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


@contextmanager
def waiting_clients(server: Any, port: int) -> Iterator[list[asyncio.BaseTransport]]:
    """WAITING clients connect while the loop stands still (the kernel completes them); yields
    the transports the server makes as its loop turns. Everything is closed at the end."""
    made: list[asyncio.BaseTransport] = []
    Counted.made = made
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(WAITING)]
    try:
        yield made
    finally:
        for client in clients:
            client.close()
        for transport in made:
            transport.close()
        server.close()


def test_every_waiting_connection_is_taken_in_one_turn(loop: GatewayLoop) -> None:
    """uvloop alone takes one connection a turn (libuv >= 1.45): in the same four turns it takes
    six of the 40."""
    server = loop.run_until_complete(loop.create_server(Counted, "127.0.0.1", 0))
    with waiting_clients(server, server.sockets[0].getsockname()[1]) as made:
        loop.run_until_complete(turns(4))  # accept; make the transports; connection_made
        assert len(made) == WAITING
        nodelay = {
            t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for t in made
        }
        assert nodelay == {1}


def test_a_closed_listener_refuses_new_connections(loop: GatewayLoop) -> None:
    Counted.made = []
    server = loop.run_until_complete(loop.create_server(Counted, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)):
        loop.run_until_complete(turns(4))
    assert len(Counted.made) == 1 and server.is_serving()
    server.close()
    assert not server.is_serving()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    for transport in Counted.made:
        transport.close()


def test_a_port_in_use_is_named_in_the_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as raised:
            bind("127.0.0.1", port)
    assert raised.value.errno == errno.EADDRINUSE
    assert raised.value.strerror == f"cannot listen on 127.0.0.1 port {port}: address already in use"


def test_a_socket_shared_by_workers_is_taken_a_few_at_a_time(loop: GatewayLoop) -> None:
    """With `--workers N` uvicorn's parent binds the socket and every worker listens on it; a
    worker that took a whole burst would leave the others idle."""
    shared = socket.socket()
    shared.bind(("127.0.0.1", 0))
    server = loop.run_until_complete(loop.create_server(Counted, sock=shared))
    with waiting_clients(server, shared.getsockname()[1]) as made:
        loop.run_until_complete(turns(2))  # a whole burst would be in by now (see the test above)
        assert 0 < len(made) < WAITING // 2
        loop.run_until_complete(turns(WAITING // SHARED_BATCH + 4))
        assert len(made) == WAITING
