"""The gateway's HTTP/1.1 client against scripted servers on loopback: keep-alive reuse, bodies by
length, chunks and close, flow control, the pool's limit, and every way a peer can fail."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from gateway import http1
from gateway.http1 import MalformedAnswer, Pool, Target, encode_headers

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
        (  # header values are case-insensitive: this is chunked too, and cut short
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n",
            "closed the connection mid-body",
        ),
        (b"HTTX/9 nonsense\r\n\r\n", "malformed answer"),
        (  # and not "closed the connection mid-body" once the server closes after it
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n-1\r\n",
            "malformed answer: Invalid character in chunk size",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "protocol switch",
        ),
        (
            b"HTTP/1.1 200 OK\r\n" + b"x-filler: %s\r\n" % (b"y" * 1000) * 70 + b"\r\n",
            "headers longer than 64 KiB",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc" + b"HTTP/1.1 200 OK\r\n\r\n", None),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"
            + b"HTTP/1.1 500 Oops\r\nx-injected: yes\r\ncontent-length: 5\r\n\r\nEXTRA",
            None,
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc" + b"<html>oops</html>\r\n", None),
    ],
    ids=[
        "nothing",
        "short-length",
        "unfinished-chunks",
        "unfinished-Chunked",
        "garbage",
        "negative-chunk-size",
        "upgrade",
        "endless-head",
        "unasked-extra",
        "unasked-extra-with-body",
        "bytes-after-the-body",
    ],
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
            assert (response.status, response.headers, await response.read()) == (
                200,
                {"content-length": "3"},
                b"abc",
            )  # nothing of the second answer in the first
            response.close()
            await asyncio.wait_for(server.closed.wait(), 1)
            await settled(pool)
        else:
            with pytest.raises(
                MalformedAnswer if "malformed" in message else httpx.RemoteProtocolError, match=message
            ):
                response = await send(pool, server.url)
                await response.read()
            await settled(pool)
    await pool.aclose()


async def test_a_header_line_that_never_ends_is_refused_at_the_head_limit() -> None:
    sent = 0

    async def endless_header(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nx-big: ")
        try:
            for _ in range(64):  # 16 MiB, never a line end: the client must stop it long before
                writer.write(b"a" * (256 * 1024))
                await writer.drain()
                sent += 256 * 1024
        except ConnectionError:
            pass
        return False

    pool = Pool()
    async with scripted(endless_header) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="headers longer than 64 KiB"):
            await asyncio.wait_for(send(pool, server.url), 5)
        await asyncio.wait_for(server.closed.wait(), 5)
        assert sent < 8 * 1024 * 1024  # closed while the socket buffers held the rest
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
    for headers in (
        {"x-key": "a\r\nx-evil: 1"},
        {"x-key\n": "a"},
        {"bad:name": "a"},
        {"Host": "twice"},
        {"content-length": "0"},
        {"Transfer-Encoding": "chunked"},
        {"connection": "close"},
    ):
        with pytest.raises(ValueError, match="cannot be sent"):
            encode_headers(headers)
    with pytest.raises(ValueError, match="plain http"):
        Target.parse("https://api.openai.com/v1")
    with pytest.raises(ValueError, match="credentials"):
        Target.parse("http://user:secret@127.0.0.1:11434")


async def test_a_body_ended_by_a_reset_is_an_error_not_a_shorter_answer() -> None:
    async def reset(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npartial-")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()
        return False

    pool = Pool()
    async with scripted(reset) as server:
        response = await send(pool, server.url)
        with pytest.raises(httpx.RemoteProtocolError, match="mid-body"):
            await response.read()
        response.close()
        await settled(pool)
    await pool.aclose()


async def test_trailers_do_not_change_the_answers_headers() -> None:
    async def trailers(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\ncontent-type: text/evil\r\nx-trailer: 1\r\n\r\n"
        )
        await writer.drain()
        return True

    pool = Pool()
    async with scripted(trailers) as server:
        for _ in range(2):  # and the connection, read to its end, is reused
            response = await send(pool, server.url)
            assert await response.read() == b"{}"
            assert response.headers == {"content-type": "application/json", "transfer-encoding": "chunked"}
            response.close()
        assert server.connections == 1
    await pool.aclose()


async def test_an_early_answer_to_an_unread_body_frees_its_connection_at_once() -> None:
    # The backend answers 413 without reading the 32 MiB body, and keeps its socket open.
    done = asyncio.Event()
    handlers: list[asyncio.Task[None]] = []

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbig")
        await writer.drain()
        await done.wait()  # not reading: the client's writes back up
        writer.close()

    pool = Pool(max_connections=1)
    listener = await asyncio.start_server(early, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/api/chat"
    async with listener:
        response = await send(pool, url, b"y" * (32 << 20))
        assert (response.status, await response.read()) == (413, b"big")
        response.close()
        await settled(pool)  # not once the backend has read 32 MiB it never will
        done.set()
        await asyncio.gather(*handlers)
    await pool.aclose()


async def test_a_woken_waiter_that_leaves_passes_the_room_on() -> None:
    pool = Pool(max_connections=1)
    async with scripted(ok) as server:
        held = await send(pool, server.url)
        first = asyncio.create_task(send(pool, server.url, timeout=2))
        second = asyncio.create_task(send(pool, server.url, timeout=2))
        await asyncio.sleep(0.05)
        await held.read()
        held.close()  # back to the pool: wakes the first waiter
        first.cancel()  # whose client leaves before it runs
        response = await asyncio.wait_for(second, 1)  # the second takes the room, not a PoolTimeout
        assert await response.read() == b'{"n": 2}'
        response.close()
        with pytest.raises(asyncio.CancelledError):
            await first
    await pool.aclose()


async def test_an_idle_connection_the_peer_closed_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "CHECK_AFTER", 0.0)  # check every reuse
    writers: list[asyncio.StreamWriter] = []

    async def answer(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writers.append(writer)
        return await ok(server, reader, writer)

    pool = Pool()
    async with scripted(answer) as server:
        response = await send(pool, server.url)
        await response.read()
        response.close()  # idle in the pool
        # The backend closes it, and the client reuses it before its loop has run to see that.
        writers[0].get_extra_info("socket").shutdown(socket.SHUT_WR)
        response = await send(pool, server.url)
        assert await response.read() == b'{"n": 2}'
        response.close()
        assert server.connections == 2
    await pool.aclose()


async def test_a_host_header_from_the_config_names_the_server_once() -> None:
    pool = Pool()
    async with scripted(ok) as server:
        target = Target.parse(server.url, authority="ollama.internal")
        response = await pool.send("POST", target, HEADERS, b"{}", 2.0)
        await response.read()
        response.close()
        head = server.requests[0].split(b"\r\n\r\n")[0].lower()
        assert [line for line in head.split(b"\r\n") if line.startswith(b"host:")] == [
            b"host: ollama.internal"
        ]
    await pool.aclose()


async def test_the_answer_to_a_head_has_no_body_whatever_its_length_says() -> None:
    async def head_answer(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1234\r\n\r\n")
        await writer.drain()
        return True

    pool = Pool()
    async with scripted(head_answer) as server:
        for _ in range(2):  # the connection is not reused: the parser there still waits for a body
            response = await pool.send("HEAD", Target.parse(server.url), HEADERS, None, 2.0)
            assert (response.status, response.headers["content-length"]) == (200, "1234")
            assert await asyncio.wait_for(response.read(), 2) == b""
            response.close()
        assert server.connections == 2
    await settled(pool)
    await pool.aclose()


async def test_an_answer_read_after_it_was_closed_is_an_error_not_another_answer() -> None:
    pool = Pool()
    async with scripted(ok) as server:
        first = await send(pool, server.url)
        assert await first.read() == b'{"n": 1}'
        first.close()  # its connection goes back to the pool and carries the next exchange
        second = await send(pool, server.url)
        with pytest.raises(RuntimeError, match="closed"):
            await first.read()
        with pytest.raises(RuntimeError, match="closed"):
            await anext(first)
        assert await second.read() == b'{"n": 2}'
        second.close()
        assert server.connections == 1
    await pool.aclose()


async def test_a_body_that_has_all_come_is_taken_at_once_and_one_still_coming_is_not() -> None:
    rest = asyncio.Event()

    async def halves(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if len(server.requests) == 1:  # the first answer in one piece, the second in two
            return await ok(server, reader, writer)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
        await writer.drain()
        await rest.wait()
        writer.write(b"-half")
        await writer.drain()
        return True

    pool = Pool()
    async with scripted(halves) as server:
        whole = await send(pool, server.url)
        for _ in range(100):  # the body may follow its head in a later read
            if (taken := whole.take()) is not None:
                break
            await asyncio.sleep(0.01)
        assert taken == b'{"n": 1}'
        assert whole.take() is None  # taken once: the answer is closed, its connection back in the pool
        with pytest.raises(RuntimeError, match="closed before its body was read"):
            await whole.read()

        half = await send(pool, server.url)
        await asyncio.sleep(0.05)
        assert half.take() is None
        rest.set()
        assert await half.read() == b"first-half"
        half.close()
        assert server.connections == 1  # taking the first answer left its connection reusable
    await pool.aclose()


@pytest.mark.parametrize(("ends_after", "reused"), [(0.01, True), (None, False)], ids=["soon", "never"])
async def test_a_whole_answer_s_unended_body_keeps_its_connection_only_if_it_ends_within_the_grace(
    ends_after: float | None, reused: bool
) -> None:
    async def marker_then_end(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nwhole\r\n")
        await writer.drain()
        if ends_after is None:
            await asyncio.sleep(5)  # held open; the client closes it first
            return False
        await asyncio.sleep(ends_after)
        writer.write(b"3\r\n...\r\n0\r\n\r\n")  # more nobody reads, then the body's end
        await writer.drain()
        return True

    pool = Pool()
    async with scripted(marker_then_end) as server:
        response = await send(pool, server.url)
        assert await anext(response.iter_bytes()) == b"whole"
        response.let_end(0.2)
        response.close()
        assert pool.open_connections == 1  # neither back in the pool nor closed yet
        await asyncio.sleep(0.4)
        assert pool.open_connections == (1 if reused else 0)
        if reused:
            again = await send(pool, server.url)
            assert await anext(again.iter_bytes()) == b"whole"
            again.close()
            assert server.connections == 1
    await pool.aclose()
