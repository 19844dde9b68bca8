"""The event loop `serve` runs on: uvloop, except for how it takes new connections.

libuv (since 1.45, as bundled by uvloop) accepts one connection each time the listening socket
polls readable, so every new connection waits for a whole turn of the loop. On a busy gateway a
turn takes milliseconds: 64 clients connecting at once during a 64-stream run were accepted over
450 ms, and the last one's first request waited that long before the gateway could read it (its
own timings never showed it). Here a listening socket has a reader that accepts every connection
waiting, up to `ACCEPT_BATCH` a turn, as asyncio's own loop does; what follows an accept (the
transport, the protocol) is uvloop's.

uvicorn asks the loop for its server (`create_server`, with a host and port or with the socket a
multi-worker parent bound), so the loop class is all it needs: `loop="gateway.listen:GatewayLoop"`.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Iterable
from typing import Any

import uvloop

ACCEPT_BATCH = 128  # connections taken per readiness of a listening socket; the rest next turn
# With `--workers N` the workers share one listening socket and all wake for a new connection:
# taking a few each keeps them balanced (one taking a whole burst would leave the others idle),
# and a busier worker, whose turns are longer, takes fewer.
SHARED_BATCH = 4
PAUSE_ON_EXHAUSTION = 1.0  # seconds without accepting when the process is out of descriptors
# accept() failures that say nothing about the listening socket: the next connection may go through
TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Listener:
    """The server `create_server` returns: the listening sockets and their readers."""

    def __init__(
        self,
        loop: GatewayLoop,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sockets: Iterable[socket.socket],
        backlog: int,
        batch: int = ACCEPT_BATCH,
    ) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._sockets = list(sockets)
        self._batch = batch
        self._serving = True
        for sock in self._sockets:
            sock.setblocking(False)
            sock.listen(backlog)
            loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(self._batch):
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in TRANSIENT:
                    continue
                if error.errno in EXHAUSTED and self._serving:  # stop polling for a while
                    self._loop.remove_reader(listening.fileno())
                    self._loop.call_later(PAUSE_ON_EXHAUSTION, self._resume, listening)
                    return
                raise
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._loop.create_task(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, sock)
        except OSError:  # the client left before its transport was made
            sock.close()

    def _resume(self, listening: socket.socket) -> None:
        if self._serving and listening.fileno() >= 0:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        """Stop accepting at once; connections already taken are the server's to finish."""
        if not self._serving:
            return
        self._serving = False
        for sock in self._sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    async def wait_closed(self) -> None:
        return None

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        await asyncio.Future()


class GatewayLoop(uvloop.Loop):
    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        **kwargs: Any,
    ) -> Any:
        if ssl is not None or kwargs:  # not what `serve` asks for: uvloop's own server
            serve: Any = super().create_server
            return await serve(protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl, **kwargs)
        if sock is not None:  # a socket bound by uvicorn's parent process, shared by the workers
            return Listener(self, protocol_factory, [sock], backlog, SHARED_BATCH)
        return Listener(self, protocol_factory, bind(host, port or 0), backlog)


def bind(host: str | None, port: int) -> list[socket.socket]:
    """A socket per address `host` resolves to (every interface when empty), bound to `port`."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as error:
                where = f"{address[0]!s} port {address[1]!s}"
                raise OSError(
                    error.errno, f"cannot listen on {where}: {(error.strerror or '').lower()}"
                ) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
