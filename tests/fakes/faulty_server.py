"""A misbehaving Ollama on raw asyncio streams, for fault injection.

Starlette cannot reset a socket, stall forever, or send bytes that are not HTTP, so this server
speaks just enough HTTP/1.1 itself: it reads a request head and a body by Content-Length, then
answers. `/api/version`, `/api/tags`, `/api/ps` and `/api/show` always answer well (the gateway's
health and inventory loop uses them); each `/api/chat` request takes the next `Script` from a
queue (which two servers may share, so "the first request, wherever it lands" gets the fault),
or `ok()` when the queue is empty.

While it handles a request the server also watches the socket: the client sends nothing more
until the answer is complete, so a read returning EOF (or a reset) means the client went away.
It records when that happened, and which connections are still in the middle of a request.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

MODEL = "llama3.2:latest"
HEAD_LIMIT = 64 * 1024
HANG_LIMIT = 20.0  # seconds a scripted hang or wait lasts at most, so nothing outlives a test
REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}


@dataclass(frozen=True)
class Step:
    """One thing the server does: see the helpers below for the kinds."""

    kind: str
    status: int = 200
    data: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    event: threading.Event | None = None


Script = list[Step]


def line(content: str = "tok ", *, done: bool = False) -> bytes:
    """One NDJSON line of a chat stream, as contracts/ollama.md describes it."""
    body: dict[str, Any] = {
        "model": MODEL,
        "created_at": "2026-01-01T00:00:00.000000001Z",
        "message": {"role": "assistant", "content": "" if done else content},
        "done": done,
    }
    if done:
        body.update(
            done_reason="stop",
            total_duration=1000,
            load_duration=10,
            prompt_eval_count=3,
            prompt_eval_duration=100,
            eval_count=2,
            eval_duration=200,
        )
    return orjson.dumps(body) + b"\n"


def head(status: int = 200, *headers: tuple[str, str]) -> Step:
    """A chunked response head (what Ollama sends for a stream)."""
    return Step("head", status=status, headers=headers)


def chunk(data: bytes) -> Step:
    """One chunk of a chunked body (only after `head`)."""
    return Step("chunk", data=data)


def end() -> Step:
    """The chunked body's terminator: a clean end of the response."""
    return Step("end")


def raw(data: bytes) -> Step:
    """Bytes written as they are, whatever they make of the answer."""
    return Step("raw", data=data)


def sleep(seconds: float) -> Step:
    return Step("sleep", seconds=seconds)


def wait(event: threading.Event) -> Step:
    """Until the test sets `event` (at most HANG_LIMIT seconds)."""
    return Step("wait", event=event)


def hang() -> Step:
    """Nothing more, until the client closes the connection (at most HANG_LIMIT seconds)."""
    return Step("hang")


def reset() -> Step:
    """Abort the connection with a TCP RST (SO_LINGER 0)."""
    return Step("reset")


def close() -> Step:
    """Close the connection cleanly (FIN), whatever state the response is in."""
    return Step("close")


def reply(status: int, body: Any, *headers: tuple[str, str]) -> Step:
    """A whole JSON response with Content-Length."""
    return Step("reply", status=status, data=orjson.dumps(body), headers=headers)


def ok(pieces: int = 2, *, stream: bool = True) -> Script:
    """A well-formed answer: a stream of `pieces` content lines then the `done` line, or one object."""
    if not stream:
        whole = orjson.loads(line(done=True))
        whole["message"]["content"] = "".join(f"t{i} " for i in range(pieces))
        return [reply(200, whole)]
    return [head(), *(chunk(line(f"t{i} ")) for i in range(pieces)), chunk(line(done=True)), end()]


def _wants_stream(body: bytes) -> bool:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return True
    return not isinstance(request, dict) or request.get("stream", True) is not False


@dataclass
class Connection:
    opened_at: float
    busy: bool = False  # between a request's head and the end of its answer
    closed_at: float | None = None
    peer_closed_at: float | None = None  # the client closed or reset it while an answer was going


@dataclass
class FaultyOllama:
    scripts: deque[Script] = field(default_factory=deque)
    chats: int = 0  # /api/chat requests received
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    connections: list[Connection] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _stop: asyncio.Event | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def queue(self, *scripts: Script) -> None:
        with self._lock:
            self.scripts.extend(scripts)

    def busy(self) -> int:
        """Connections in the middle of a request: what the client opened and did not finish or close."""
        return sum(1 for conn in self.connections if conn.busy)

    def peer_closes(self) -> list[float]:
        return [conn.peer_closed_at for conn in self.connections if conn.peer_closed_at is not None]

    # ---- the server ----

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = Connection(opened_at=time.monotonic())
        self.connections.append(conn)
        try:
            while await self._one_request(reader, writer, conn):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            conn.busy = False
            conn.closed_at = time.monotonic()
            writer.transport.abort()
            self._handlers.discard(task)

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> bool:
        """Serve one request; False when the connection is done."""
        raw = await reader.readuntil(b"\r\n\r\n")
        if len(raw) > HEAD_LIMIT:
            return False
        request_line, *header_lines = raw.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {}
        for header in header_lines:
            if ":" in header:
                name, value = header.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        conn.busy = True
        self.requests.append((method, path))
        if path != "/api/chat":
            await self._run(writer, [reply(*self._static(path))])
            conn.busy = False
            return True
        self.chats += 1
        with self._lock:
            script = self.scripts.popleft() if self.scripts else ok(stream=_wants_stream(body))
        watcher = asyncio.ensure_future(reader.read(1))  # the client sends nothing until answered
        runner = asyncio.ensure_future(self._run(writer, script))
        try:
            await asyncio.wait((watcher, runner), return_when=asyncio.FIRST_COMPLETED)
        finally:
            runner.cancel()
            watcher.cancel()
            await asyncio.wait((watcher, runner))
        if watcher.done() and not watcher.cancelled():
            if watcher.exception() is not None or watcher.result() == b"":
                conn.peer_closed_at = time.monotonic()
            return False
        if runner.cancelled() or runner.exception() is not None:
            return False
        conn.busy = False
        return bool(runner.result())

    @staticmethod
    def _static(path: str) -> tuple[int, Any]:
        if path == "/api/version":
            return 200, {"version": "0.5.4"}
        if path == "/api/tags":
            return 200, {"models": [{"name": MODEL, "model": MODEL, "size": 1, "details": {}}]}
        if path == "/api/ps":
            return 200, {"models": []}
        if path == "/api/show":
            return 200, {"parameters": "num_ctx 4096", "details": {}}
        return 404, {"error": "404 page not found"}

    async def _run(self, writer: asyncio.StreamWriter, script: Script) -> bool:
        """Play a script; True when the connection can serve another request."""
        for step in script:
            if step.kind == "head":
                head_lines = [f"HTTP/1.1 {step.status} {REASONS.get(step.status, 'Status')}"]
                head_lines += ["Content-Type: application/x-ndjson", "Transfer-Encoding: chunked"]
                head_lines += [f"{k}: {v}" for k, v in step.headers]
                writer.write(("\r\n".join(head_lines) + "\r\n\r\n").encode("latin-1"))
            elif step.kind == "chunk":
                writer.write(b"%x\r\n%s\r\n" % (len(step.data), step.data))
            elif step.kind == "end":
                writer.write(b"0\r\n\r\n")
            elif step.kind == "reply":
                head_lines = [f"HTTP/1.1 {step.status} {REASONS.get(step.status, 'Status')}"]
                head_lines += ["Content-Type: application/json", f"Content-Length: {len(step.data)}"]
                head_lines += [f"{k}: {v}" for k, v in step.headers]
                writer.write(("\r\n".join(head_lines) + "\r\n\r\n").encode("latin-1") + step.data)
            elif step.kind == "raw":
                writer.write(step.data)
            elif step.kind == "sleep":
                await asyncio.sleep(step.seconds)
            elif step.kind == "wait":
                assert step.event is not None
                deadline = time.monotonic() + HANG_LIMIT
                while not step.event.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            elif step.kind == "hang":
                await asyncio.sleep(HANG_LIMIT)
                return False
            elif step.kind == "reset":
                await writer.drain()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            elif step.kind == "close":
                await writer.drain()
                writer.close()
                return False
            else:
                raise ValueError(f"unknown step {step.kind!r}")
            await writer.drain()
        return True

    # ---- the thread ----

    def _thread_main(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(self._main(started))
        loop.close()

    async def _main(self, started: threading.Event) -> None:
        stop = self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        await stop.wait()
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2)

    @contextmanager
    def running(self) -> Iterator[FaultyOllama]:
        started = threading.Event()
        thread = threading.Thread(target=self._thread_main, args=(started,), daemon=True)
        thread.start()
        if not started.wait(5):
            raise TimeoutError("the faulty server did not start in 5 s")
        try:
            yield self
        finally:
            assert self._loop is not None
            assert self._stop is not None
            self._loop.call_soon_threadsafe(self._stop.set)
            thread.join(timeout=5)
            if thread.is_alive():
                raise RuntimeError("the faulty server did not stop in 5 s")


@contextmanager
def faulty_servers(count: int) -> Iterator[list[FaultyOllama]]:
    """`count` servers sharing one script queue: the next /api/chat, on any of them, takes the next script."""
    shared: deque[Script] = deque()
    lock = threading.Lock()
    servers = [FaultyOllama(scripts=shared, _lock=lock) for _ in range(count)]
    with _all_running(servers):
        yield servers


@contextmanager
def _all_running(servers: list[FaultyOllama]) -> Iterator[None]:
    if not servers:
        yield
        return
    with servers[0].running(), _all_running(servers[1:]):
        yield
