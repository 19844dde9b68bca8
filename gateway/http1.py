"""A small HTTP/1.1 client for plain-http backends, on asyncio protocols and httptools' parser.

The Ollama instances and OpenAI-compatible servers on the premises are what the gateway talks to
most, over plain http on a LAN. The profile in bench/README.md put the general-purpose client
(httpx's models over aiohttp's pool) at over 40% of the CPU a request costs; this client does only
what the gateway needs, and does it in a few calls per request: one write of a request head built
from pre-encoded headers, httptools' C parser feeding a per-connection buffer, keep-alive reuse.
https backends (the cloud APIs) stay on the general client, where the network dominates anyway.

What it guarantees:
- a connection goes back to the pool only after its answer was read to the end; an answer
  abandoned mid-body closes its connection, which is how a backend learns to stop generating;
- a keep-alive connection idle for IDLE_SECONDS is not reused: servers close theirs after a few
  seconds (uvicorn after 5), and a request written just as the server closes would fail. A request
  is never sent twice (a POST may have started a generation): a connection that closes before
  answering is a failure for dispatch to retry on another instance. Nor is it kept: one timer
  closes it, so that a backend no longer asked (removed by a reload) is not held open for good by
  a server that never closes idle connections itself (Ollama's Go server does not);
- reading pauses when more than READ_HIGH body bytes wait for the reader;
- an answer is what its framing says and nothing else: a body cut short, whatever its framing, or
  by a reset, is an error, never a shorter answer; headers past HEAD_LIMIT (a header line that
  never ends too), trailers, and bytes after the answer are not taken in;
- failures are httpx's exceptions, the vocabulary `upstream.MappedErrors` maps to gateway
  errors: refused or unresolvable -> ConnectError, connect deadline -> ConnectTimeout, no free
  connection in time -> PoolTimeout, the peer closing before or during an answer ->
  RemoteProtocolError, an answer that is not HTTP/1.1 or breaks its framing -> MalformedAnswer
  (a RemoteProtocolError: the backend answered, just not in a way that can be read).
"""

from __future__ import annotations

import asyncio
import collections
import select
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import httpx

READ_HIGH = 256 * 1024  # body bytes buffered before reading from the socket pauses
IDLE_PER_HOST = 256  # keep-alive connections kept per backend; more are closed when released
IDLE_SECONDS = 4.0  # an idle connection older than this is closed instead of reused
CHECK_AFTER = 1.0  # an idle connection older than this is checked for a close not yet seen
HEAD_LIMIT = 64 * 1024  # bytes of header names and values in one answer; of its head on the wire
# Set by the backend's own config, or by this client from the body: never from extra headers.
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class MalformedAnswer(httpx.RemoteProtocolError):
    """The peer answered with bytes that are not an HTTP/1.1 answer, or broke its framing."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes, parsed once: the connection key and the request line's target."""

    host: str
    port: int
    authority: bytes  # the Host header
    path: bytes  # path and query

    @classmethod
    def parse(cls, url: str, authority: str | None = None) -> Target:
        """`authority`: the Host header, when the backend's config sets one; else the URL's."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not a plain http URL: {url!r}")
        if "@" in parts.netloc:
            raise ValueError("credentials in a URL are not sent")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = authority or parts.netloc
        return cls(parts.hostname, parts.port or 80, host.encode("ascii"), path.encode("ascii"))


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """Header lines for every request of one backend; ValueError for a value that would break
    the framing (CR or LF), or for a header the client sets itself (FRAMING_HEADERS)."""
    lines = []
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n") or ":" in name or name.lower() in FRAMING_HEADERS:
            raise ValueError(f"header {name!r} cannot be sent as is")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(lines)


class Response:
    """One answer: status and headers at once, the body as it arrives. `close()` when done."""

    __slots__ = ("_closed", "_connection", "headers", "status")

    def __init__(self, connection: _Connection, status: int, headers: dict[str, str]) -> None:
        self._connection = connection
        self._closed = False  # once closed, its connection may carry another exchange
        self.status = status
        self.headers = headers  # lower-case names

    async def read(self) -> bytes:
        if self._closed:
            raise RuntimeError("the answer was closed before its body was read")
        connection = self._connection
        parts = []
        while (part := await connection.next_chunk()) is not None:
            parts.append(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def take(self) -> bytes | None:
        """The whole body, the answer closed, when all of it has arrived already (as a short JSON
        answer's has by the time its head is read); else None, and nothing changes."""
        if self._closed or (data := self._connection.whole_body()) is None:
            return None
        self.close()
        return data

    def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives (the answer is its own iterator: no generator in between)."""
        return self

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise RuntimeError("the answer was closed before its body was read")
        chunk = await self._connection.next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        self._closed = True
        self._connection.finish()

    def let_end(self, seconds: float) -> None:
        """The caller has the whole answer: once closed, a body that has not ended yet may end
        within `seconds`, what comes meanwhile dropped, and the connection go back to the pool."""
        self._connection.grace = seconds

    async def aclose(self) -> None:
        self.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection, carrying one exchange at a time."""

    def __init__(self, pool: Pool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.alive = True  # false once closed, or once its framing cannot be trusted
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._reset()

    def _reset(self) -> None:
        self._head: asyncio.Future[Response] | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._interim = False  # a 1xx answer is being parsed: the real one follows
        self._until_close = False  # the body has no length and no chunks: it ends when the peer closes
        self._head_bytes = 0
        self._head_read = 0  # bytes received before the answer's head was whole (1xx answers too)
        self._extra = False  # bytes after the answer: ignored, and the connection not reused
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._busy = False
        self._bodiless = False  # the answer to a HEAD: its Content-Length describes a body not sent
        self.grace = 0.0  # seconds a body unended at `finish` may take to end (Response.let_end)
        self._ending: asyncio.TimerHandle | None = None  # that wait, while it lasts

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if not self._busy:  # nothing was asked: whatever this is, the connection is not to be trusted
            self._close()
            return
        if not self._status:
            self._head_read += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
            if not self._complete:  # else the answer was whole, and what follows it is not taken in
                self._fail(MalformedAnswer(f"malformed answer: {_why(error)}"))
            self._close()
        else:
            if self._extra:
                self._close()
            elif not self._status and self._head_read > HEAD_LIMIT:
                # A header line that has not ended yet: the parser would keep all of it, copying
                # what it has at every read, and `on_header` would see it only at its end.
                self._fail(MalformedAnswer(f"malformed answer: {_too_long()}"))
                self._close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.pool.closed(self)
        if self._ending is not None:
            self._ending.cancel()
            self._ending, self._busy = None, False
        if self._busy and not self._complete and self._error is None:  # else the failure is said
            if self._head is not None and not self._head.done():
                self._fail(httpx.RemoteProtocolError("closed the connection before answering"))
            elif self._until_close and exc is None:  # a clean close is how such a body ends
                self._complete = True
                self._wake()
            else:
                self._fail(httpx.RemoteProtocolError("closed the connection mid-body"))

    def pause_writing(self) -> None:  # request bodies are written whole; the buffer absorbs them
        pass

    def resume_writing(self) -> None:
        pass

    # ---- httptools callbacks ----

    def on_message_begin(self) -> None:
        if self._status:  # a second answer to one request: the stream cannot be trusted
            self.alive = False
            self._extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._status:  # a chunked body's trailers, or an answer nobody asked for
            return
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > HEAD_LIMIT:
            raise ValueError(_too_long())
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._extra:
            return
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: informational, the answer comes after
            self._interim = True
            self._headers = {}
            self._head_bytes = 0
            return
        self._status = status
        headers = self._headers
        if self._bodiless:  # complete now; the parser would wait for the body, so no reuse
            self._complete, self._extra, self.alive = True, True, False
        self._until_close = (
            not self._bodiless
            and status not in (204, 304)
            and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )
        if self._head is not None and not self._head.done():
            self._head.set_result(Response(self, self._status, headers))

    def on_body(self, body: bytes) -> None:
        if self._extra:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._extra:
            return
        if self._interim:
            self._interim = False
            return
        self._complete = True
        if not self._parser.should_keep_alive():
            self.alive = False
        if self._ending is not None:
            self._ended()
        self._wake()

    # ---- one exchange ----

    def exchange(self, data: bytes, bodiless: bool = False) -> asyncio.Future[Response]:
        """Sends `data`; the future is the answer's head (awaited by the caller itself)."""
        self._reset()
        self._busy = True
        self._bodiless = bodiless
        head = self._head = self._loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        return head

    async def next_chunk(self) -> bytes | None:
        """All of the body that has arrived since the last call (a chunked body's pieces together:
        its reader decodes them in one go, and relays them in one write); None at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def whole_body(self) -> bytes | None:
        """The body, taken, when all of it has arrived and nothing went wrong; else None."""
        if not self._complete or self._error is not None or self._paused:
            return None
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return data

    def finish(self) -> None:
        """The caller is done with the answer: back to the pool when it was read to the end,
        closed otherwise (the backend sees the disconnect)."""
        if not self._busy:
            return
        if self._complete and not self._chunks and self.alive and self._error is None:
            self._busy = False
            self.pool.release(self)
        elif self.grace and not self._complete and self.alive and self._error is None:
            self._chunks.clear()  # nobody's: the caller has the whole answer
            self._buffered = 0
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
            self._ending = self._loop.call_later(self.grace, self._not_ended)
        else:
            self._busy = False
            # The failure's traceback holds the frames that read this connection: kept here, it
            # would make a reference cycle holding the request, until a full collection.
            self._error = self._head = None
            self._close()

    def _ended(self) -> None:
        """The body ended within its grace: the connection serves the next request."""
        assert self._ending is not None
        self._ending.cancel()
        self._ending, self._busy = None, False
        self._chunks.clear()
        if self.alive and self._error is None:
            self.pool.release(self)
        else:
            self._close()

    def _not_ended(self) -> None:
        self._ending, self._busy = None, False
        self._close()

    def _fail(self, error: Exception) -> None:
        self.alive = False
        self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _close(self) -> None:
        """At once: `close()` would wait until the backend had read whatever of the request is
        still unsent, keeping the connection and its place in the pool until then."""
        self.alive = False
        if self.transport is not None:
            self.transport.abort()

    def closed_by_peer(self) -> bool:
        """Whether the socket has something to read while idle: the peer's close (or bytes nobody
        asked for), which the loop may not have handed over yet."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


def _too_long() -> str:
    return f"headers longer than {HEAD_LIMIT // 1024} KiB"


def _why(error: Exception) -> str:
    if isinstance(error, httptools.HttpParserUpgrade):
        return "a protocol switch nobody asked for"
    if isinstance(error, httptools.HttpParserCallbackError) and error.__context__ is not None:
        return str(error.__context__)  # ours, raised in a callback
    return str(error)


async def _connect(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], _Connection], host: str, port: int
) -> _Connection:
    """A connection to `host`, made so that cancelling it (a deadline, a shutdown) is safe.

    uvloop (0.23) crashes the process when `create_connection(host, port)` is cancelled just as
    the connection is made: the transport is closed, and its `connection_made` call, already
    scheduled, then reads the closed handle (a segfault; seen when a shutdown cancels the start-up
    probes). So the socket is connected with `sock_connect`, which cancels cleanly, and handed to
    `create_connection(sock=...)`, which takes one turn of the loop and is never cancelled: when the
    caller is, what it opens is closed as soon as it is open."""
    sock = await _connected_socket(loop, host, port)
    opening = asyncio.ensure_future(loop.create_connection(factory, sock=sock))
    try:
        _, protocol = await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise
    except BaseException:
        sock.detach()  # uvloop closed the descriptor itself: the socket must not close it again
        raise
    return protocol


def _close_opened(opening: asyncio.Future[tuple[asyncio.Transport, _Connection]]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result()[0].abort()


async def _connected_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A non-blocking socket connected to the first of `host`'s addresses that takes it."""
    addresses: list[tuple[int, Any]]
    try:
        addresses = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
        socket.inet_pton(addresses[0][0], host)  # an address: nothing to look up
    except OSError:
        found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        addresses = [(family, address) for family, _, _, _, address in found]
    error: OSError | None = None
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as failed:
            sock.close()
            error = failed
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"{host} has no address")


class Pool:
    """Keep-alive connections to any number of plain-http backends, at most `max_connections`
    open at once; a request that finds none free waits up to its connect deadline, or `wait`
    seconds when that is set (then connecting has its whole connect deadline after the wait)."""

    def __init__(self, max_connections: int = 1000, wait: float | None = None) -> None:
        self._max = max_connections
        self._wait = wait
        self._open = 0
        self._idle: dict[tuple[str, int], list[_Connection]] = {}  # each list oldest first
        self._all: set[_Connection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None  # while connections are idle: _close_stale

    async def send(
        self, method: str, target: Target, headers: bytes, body: bytes | None, connect_timeout: float
    ) -> Response:
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\n%s" % (method.encode(), target.path, target.authority, headers)
        if body is not None:
            head += b"content-length: %d\r\n\r\n%s" % (len(body), body)
        else:
            head += b"\r\n"
        connection = await self._acquire(target, connect_timeout)
        try:
            return await connection.exchange(head, method == "HEAD")
        except BaseException:
            connection.finish()  # cancelled or failed: never back to the pool half-used
            raise

    async def _acquire(self, target: Target, timeout: float) -> _Connection:
        key = (target.host, target.port)
        loop = asyncio.get_running_loop()
        patience = timeout if self._wait is None else self._wait
        deadline = loop.time() + patience
        while True:
            idle = self._idle.get(key)
            while idle:
                connection = idle.pop()
                idle_for = loop.time() - connection.idle_since
                # A connection just used is not what the peer closes; one idle a while may be.
                if (
                    connection.alive
                    and idle_for < IDLE_SECONDS
                    and (idle_for < CHECK_AFTER or not connection.closed_by_peer())
                ):
                    return connection
                connection._close()
            if self._open < self._max:
                break
            self._evict_idle()  # room held by idle connections to other backends is given back
            await self._wait_for_room(deadline - loop.time(), patience)
        self._open += 1
        if self._wait is not None:  # the wait was apart: connecting gets the whole connect deadline
            deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.0)):  # what is left of it
                protocol = await _connect(loop, lambda: _Connection(self, key), target.host, target.port)
        except TimeoutError:
            self._room()
            raise httpx.ConnectTimeout(f"connecting to {target.host}:{target.port} timed out") from None
        except OSError as error:
            self._room()
            raise httpx.ConnectError(str(error) or type(error).__name__) from error
        except BaseException:
            self._room()
            raise
        self._all.add(protocol)
        return protocol

    async def _wait_for_room(self, left: float, timeout: float) -> None:
        """Until a connection closes or goes idle, or the request's wait for one runs out."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(left, 0.0)):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, but leaving (cancelled, or out of time): the next one goes
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            if isinstance(error, TimeoutError):
                raise httpx.PoolTimeout(f"no free connection within {timeout:g} s") from None
            raise

    def _room(self) -> None:
        """A connection closed (or never opened): one waiting request may open one."""
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _evict_idle(self) -> None:
        for idle in self._idle.values():
            if idle:
                idle.pop(0)._close()  # the oldest; connection_lost makes the room
                return

    def release(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= IDLE_PER_HOST:
            connection._close()
            return
        now = connection.idle_since = asyncio.get_running_loop().time()
        while idle and now - idle[0].idle_since >= IDLE_SECONDS:  # the oldest first
            idle.pop(0)._close()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._close_stale)
        self._wake_one()  # a request waiting for room may take it

    def _close_stale(self) -> None:
        """Every IDLE_SECONDS while connections are idle: close those idle that long, which no
        request would reuse, whether or not their backend is asked again."""
        now = asyncio.get_running_loop().time()
        for key, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_since >= IDLE_SECONDS:  # the oldest first
                idle.pop(0)._close()
            if not idle:
                del self._idle[key]
        self._sweep = None
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._close_stale)

    def closed(self, connection: _Connection) -> None:
        if connection not in self._all:
            return
        self._all.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        self._room()

    async def aclose(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in list(self._all):
            connection._close()
        if self._all:
            await asyncio.sleep(0)  # let the transports run connection_lost

    @property
    def open_connections(self) -> int:
        return self._open
