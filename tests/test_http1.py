"""The gateway's HTTP/1.1 client against scripted servers on loopback: keep-alive reuse, bodies by
length, chunks and close, flow control, the pool's limit, and every way a peer can fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from gateway import http1
from gateway.http1 import Pool, Target, encode_headers

pytestmark = pytest.mark.anyio
HEADERS = encode_headers({"user-agent": "test", "accept": "application/json"})
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a client connection ended


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    return head


@asynccontextmanager
async def scripted(
    answer: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]],
) -> AsyncIterator[Server]:
    """A server that runs `answer` for each request on a connection until it returns False.
    Connections still open at the end are closed: from Python 3.12.1 the end of `async with` on
    an asyncio server waits for every connection, and a pool keeps its connections alive."""
    server = Server("")
    open_writers: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        open_writers.add(writer)
        try:
            while True:
                try:
                    server.requests.append(await read_request(reader))
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if not await answer(server, reader, writer):
                    break
        finally:
            open_writers.discard(writer)
            writer.close()
            server.closed.set()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/api/chat"
    async with listener:
        try:
            yield server
        finally:
            for writer in list(open_writers):
                writer.close()


async def ok(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    body = b'{"n": %d}' % len(server.requests)
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    await writer.drain()
    return True


async def settled(pool: Pool) -> None:
    """Every connection closed (a closed transport reports it on a later loop iteration)."""
    for _ in range(100):
        if pool.open_connections == 0:
            return
        await asyncio.sleep(0.01)
    assert pool.open_connections == 0


async def send(pool: Pool, url: str, body: bytes | None = b"{}", timeout: float = 2.0) -> http1.Response:
    return await pool.send("POST", Target.parse(url), HEADERS, body, timeout)


async def test_keep_alive_reuses_one_connection_and_writes_a_well_formed_request() -> None:
    pool = Pool()
    async with scripted(ok) as server:
        answers = []
        for _ in range(5):
            response = await send(pool, server.url + "?x=1", b'{"a": 1}')
            answers.append((response.status, response.headers["content-type"], await response.read()))
            response.close()
        assert answers == [(200, "application/json", b'{"n": %d}' % n) for n in range(1, 6)]
        assert server.connections == 1
        port = server.url.split(":")[2].split("/")[0]
        assert server.requests[0] == (
            b"POST /api/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:%s\r\n" % port.encode()
            + b"user-agent: test\r\naccept: application/json\r\n"
            + b'content-length: 8\r\n\r\n{"a": 1}'
        )
    await pool.aclose()


async def test_a_chunked_body_arrives_piece_by_piece() -> None:
    second = asyncio.Event()

    async def chunks(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await second.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        return True

    pool = Pool()
    async with scripted(chunks) as server:
        response = await send(pool, server.url)
        pieces = response.iter_bytes()
        assert await anext(pieces) == b"first"  # before the server wrote the rest
        second.set()
        assert [piece async for piece in pieces] == [b"second"]
        response.close()
        again = await send(pool, server.url)  # read to the end: the connection is reused
        second.set()
        assert await again.read() == b"firstsecond"
        again.close()
        assert server.connections == 1
    await pool.aclose()


async def test_an_informational_answer_is_skipped_for_the_real_one() -> None:
    async def hints(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nx-real: 1\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        return True

    pool = Pool()
    async with scripted(hints) as server:
        for _ in range(2):
            response = await send(pool, server.url)
            assert (response.status, response.headers, await response.read()) == (
                200,
                {"x-real": "1", "content-length": "2"},
                b"ok",
            )
            response.close()
        assert server.connections == 1
    await pool.aclose()


async def test_a_body_ended_by_close_is_read_whole_and_its_connection_not_reused() -> None:
    async def close_delimited(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        return False

    pool = Pool()
    async with scripted(close_delimited) as server:
        for _ in range(2):
            response = await send(pool, server.url)
            assert await response.read() == b"all of it"
            response.close()
        assert server.connections == 2
    await pool.aclose()


async def test_an_abandoned_body_closes_the_connection_so_the_backend_sees_it() -> None:
    async def endless(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"4\r\ntick\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            return False

    pool = Pool()
    async with scripted(endless) as server:
        response = await send(pool, server.url)
        assert await anext(response.iter_bytes()) == b"tick"
        response.close()
        await asyncio.wait_for(server.closed.wait(), 1)
        await settled(pool)
    await pool.aclose()


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (b"", "closed the connection before answering"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "closed the connection mid-body"),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            "closed the connection mid-body",
        ),
        (b"HTTX/9 nonsense\r\n\r\n", "malformed answer"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc" + b"HTTP/1.1 200 OK\r\n\r\n", None),
    ],
    ids=["nothing", "short-length", "unfinished-chunks", "garbage", "unasked-extra"],
)
async def test_a_broken_answer_is_a_remote_protocol_error(script: bytes, message: str | None) -> None:
    async def broken(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(script)
        await writer.drain()
        return message is None  # keep the connection only for the unasked-extra case

    pool = Pool()
    async with scripted(broken) as server:
        if message is None:  # an answer nobody asked for makes the connection untrustworthy
            response = await send(pool, server.url)
            assert await response.read() == b"abc"
            response.close()
            await asyncio.wait_for(server.closed.wait(), 1)
            await settled(pool)
        else:
            with pytest.raises(httpx.RemoteProtocolError, match=message):
                response = await send(pool, server.url)
                await response.read()
            await settled(pool)
    await pool.aclose()


async def test_nothing_listening_is_a_connect_error() -> None:
    pool = Pool()
    async with scripted(ok) as server:
        url = server.url
    with pytest.raises(httpx.ConnectError):
        await send(pool, url)
    assert pool.open_connections == 0


async def test_the_pool_limit_makes_a_request_wait_then_time_out() -> None:
    pool = Pool(max_connections=1)
    async with scripted(ok) as server:
        held = await send(pool, server.url)
        with pytest.raises(httpx.PoolTimeout):
            await send(pool, server.url, timeout=0.2)
        waiting = asyncio.create_task(send(pool, server.url))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await held.read()
        held.close()  # back to the pool: the waiting request takes it
        response = await asyncio.wait_for(waiting, 1)
        assert await response.read() == b'{"n": 2}'
        response.close()
        assert server.connections == 1
    await pool.aclose()


async def test_reading_pauses_when_the_reader_falls_behind() -> None:
    size = 16 * 1024 * 1024
    writers: list[asyncio.StreamWriter] = []

    async def huge(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writers.append(writer)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size)
        await writer.drain()
        return True

    pool = Pool()
    async with scripted(huge) as server:
        response = await send(pool, server.url)
        await asyncio.sleep(0.2)  # the client reads nothing meanwhile
        unsent = writers[0].transport.get_write_buffer_size()
        assert unsent > size // 2, "the client kept reading into memory"
        assert len(await response.read()) == size  # and reading on resumes it
        response.close()
    await pool.aclose()


async def test_an_idle_connection_is_not_reused_after_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "IDLE_SECONDS", 0.05)
    pool = Pool()
    async with scripted(ok) as server:
        for _ in range(2):
            response = await send(pool, server.url)
            await response.read()
            response.close()
            await asyncio.sleep(0.1)
        assert server.connections == 2
    await pool.aclose()


def test_headers_that_would_break_the_framing_are_refused() -> None:
    for headers in ({"x-key": "a\r\nx-evil: 1"}, {"x-key\n": "a"}, {"bad:name": "a"}):
        with pytest.raises(ValueError, match="cannot be sent"):
            encode_headers(headers)
    with pytest.raises(ValueError, match="plain http"):
        Target.parse("https://api.openai.com/v1")
