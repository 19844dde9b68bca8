"""A fast mock upstream for the benchmarks: Ollama's native API and OpenAI's chat API, nothing else.

A bare `asyncio.Protocol` HTTP/1.1 server (keep-alive, pipelining, uvloop when importable), so that
the mock is never what limits a benchmark. It answers instantly by default; `--delay-ms` paces the
stream tokens like a real engine.

    POST /api/chat              Ollama: NDJSON stream (the default, as in Ollama) or one JSON object
    GET  /api/tags, /api/ps, /api/version (also HEAD), POST /api/show
    POST /v1/chat/completions   OpenAI: SSE stream ending in `data: [DONE]`, or one JSON object
    GET  /v1/models
    GET  /_mock/stats, POST /_mock/reset
                                counters for the driver: requests served, streams completed and the
                                pacing (sum of token delays) those streams were given

Every stream carries `--chunks` content pieces, in chunked transfer encoding
(`application/x-ndjson` or `text/event-stream`), then Ollama's final `done: true` line with
`done_reason` and the counts and durations, or OpenAI's finish chunk (plus the usage chunk when
`stream_options.include_usage` is set) and `data: [DONE]`. The answer's `model` echoes the request's.

    python bench/mock_upstream.py --port 11500 [--chunks 20] [--delay-ms 10-50] [--seed 1]

`--delay-ms X` sleeps X ms before each content piece; `A-B` draws each delay uniformly from [A, B]
with a generator seeded by `--seed`. Loopback only unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

try:
    import orjson

    _dumps: Callable[[Any], bytes] = orjson.dumps
    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is a gateway dependency

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    _loads = json.loads

WORDS = (
    "The", " sky", " is", " blue", " because", " sunlight", " scatters", " off", " the", " air",
    ",", " and", " blue", " light", " scatters", " the", " most", " of", " all", ".",
)  # fmt: skip
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large"}
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
ID_WIDTH = 16  # hex digits of the OpenAI completion id, so that a cached stream can be patched in place
ID_SLOT = b"chatcmpl-" + b"#" * ID_WIDTH


def parse_delay(text: str) -> tuple[float, float]:
    """`"0"`, `"25"` or `"10-50"` (milliseconds) -> (low, high) in seconds."""
    low, _, high = text.partition("-")
    a, b = float(low), float(high or low)
    if a < 0 or b < a:
        raise ValueError(f"bad delay range {text!r}: want X or A-B with 0 <= A <= B")
    return a / 1000, b / 1000


@dataclass
class Options:
    chunks: int = 20
    delay: tuple[float, float] = (0.0, 0.0)  # seconds, uniform range; (0, 0) = no pacing
    model: str = "llama3.2:latest"
    seed: int = 1


@dataclass
class Stats:
    requests: int = 0
    streams: int = 0  # streams written to the end
    paced_seconds: float = 0.0  # sum over those streams of their token delays

    def as_json(self) -> dict[str, Any]:
        mean = self.paced_seconds / self.streams * 1000 if self.streams else 0.0
        return {
            "requests": self.requests,
            "streams": self.streams,
            "paced_ms_total": self.paced_seconds * 1000,
            "paced_ms_mean": mean,
        }


@dataclass
class Request:
    method: str
    path: str
    body: bytes
    close: bool


def rfc3339(ns: int) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


def chunk(data: bytes) -> bytes:
    """One piece of a chunked transfer-encoded body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def prompt_tokens(body: dict[str, Any]) -> int:
    """A rough token count of the prompt (4 characters a token), like an engine's report."""
    chars = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    return max(1, chars // 4)


@dataclass
class Mock:
    """The routes, the cached stream bodies and the counters; one per server."""

    options: Options = field(default_factory=Options)
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.pieces = [WORDS[i % len(WORDS)] for i in range(self.options.chunks)]
        self.text = "".join(self.pieces)
        self.paced = self.options.delay[1] > 0
        self.rng = random.Random(self.options.seed)
        self.ids = itertools.count(1)
        self._cache: dict[tuple[str, str, bool], tuple[int, bytes]] = {}
        self.started = int(time.time())

    # ---- pacing ----

    def delays(self) -> list[float]:
        low, high = self.options.delay
        return [self.rng.uniform(low, high) for _ in self.pieces] if self.paced else [0.0] * len(self.pieces)

    # ---- Ollama ----

    def ollama_line(self, model: str, content: str, created_at: str) -> bytes:
        return _dumps({
            "model": model,
            "created_at": created_at,
            "message": {"role": "assistant", "content": content},
            "done": False,
        }) + b"\n"  # fmt: skip

    def ollama_final(self, model: str, request: dict[str, Any], elapsed_ns: int, content: str) -> bytes:
        eval_ns = max(1, elapsed_ns)
        return _dumps({
            "model": model,
            "created_at": rfc3339(time.time_ns()),
            "message": {"role": "assistant", "content": content},
            "done": True,
            "done_reason": "stop",
            "total_duration": eval_ns + 2000,
            "load_duration": 1000,
            "prompt_eval_count": prompt_tokens(request),
            "prompt_eval_duration": 1000,
            "eval_count": len(self.pieces),
            "eval_duration": eval_ns,
        })  # fmt: skip

    # ---- OpenAI ----

    def openai_chunk(
        self, model: str, created: int, delta: dict[str, Any], finish: str | None, usage: bool
    ) -> bytes:
        body: dict[str, Any] = {
            "id": ID_SLOT.decode(),
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if usage:
            body["usage"] = None
        return b"data: " + _dumps(body) + b"\n\n"

    def openai_usage(self, request: dict[str, Any]) -> dict[str, int]:
        prompt = prompt_tokens(request)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(self.pieces),
            "total_tokens": prompt + len(self.pieces),
        }

    def openai_usage_chunk(self, model: str, created: int, request: dict[str, Any]) -> bytes:
        body = {
            "id": ID_SLOT.decode(),
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [],
            "usage": self.openai_usage(request),
        }
        return b"data: " + _dumps(body) + b"\n\n"

    def new_id(self) -> bytes:
        return b"chatcmpl-%0*x" % (ID_WIDTH, next(self.ids))

    def cached_body(self, kind: str, model: str, usage: bool) -> bytes:
        """The content part of an unpaced stream, chunk-framed; rebuilt once a second (timestamps)."""
        now = int(time.time())
        key = (kind, model, usage)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == now:
            return hit[1]
        if kind == "ollama":
            stamp = rfc3339(time.time_ns())
            lines = [self.ollama_line(model, piece, stamp) for piece in self.pieces]
        else:
            lines = [self.openai_chunk(model, now, {"role": "assistant", "content": ""}, None, usage)]
            lines += [self.openai_chunk(model, now, {"content": piece}, None, usage) for piece in self.pieces]
            lines.append(self.openai_chunk(model, now, {}, "stop", usage))
        body = b"".join(chunk(line) for line in lines)
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = (now, body)
        return body

    # ---- routing ----

    def handle(self, conn: Connection, request: Request) -> None:
        self.stats.requests += 1
        route = (request.method, request.path.split("?", 1)[0])
        if route == ("POST", "/api/chat"):
            self.ollama_chat(conn, request)
        elif route == ("POST", "/v1/chat/completions"):
            self.openai_chat(conn, request)
        elif route[1] in GETS and request.method in ("GET", "HEAD"):
            body = _dumps(GETS[route[1]](self))
            conn.respond(200, "application/json", body, request.close, head_only=request.method == "HEAD")
        elif route == ("POST", "/api/show"):
            conn.respond(200, "application/json", _dumps(self.show()), request.close)
        elif route == ("POST", "/_mock/reset"):
            self.stats = Stats()
            conn.respond(200, "application/json", b"{}", request.close)
        elif route[1] in ("/api/chat", "/v1/chat/completions", "/_mock/reset"):
            conn.respond(405, "application/json", b'{"error":"method not allowed"}', request.close)
        else:
            conn.respond(404, "application/json", b'{"error":"404 page not found"}', request.close)

    def body_of(self, conn: Connection, request: Request) -> dict[str, Any] | None:
        try:
            body = _loads(request.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            conn.respond(400, "application/json", b'{"error":"invalid JSON body"}', request.close)
            return None
        return body

    def ollama_chat(self, conn: Connection, request: Request) -> None:
        body = self.body_of(conn, request)
        if body is None:
            return
        model = str(body.get("model") or self.options.model)
        if body.get("stream") is False:
            final = self.ollama_final(model, body, 1000, self.text)
            conn.respond(200, "application/json; charset=utf-8", final, request.close)
            return
        start = time.perf_counter_ns()
        if self.paced:
            conn.stream_paced(request, "application/x-ndjson", self.paced_ollama(model, body, start))
            return
        final = chunk(self.ollama_final(model, body, time.perf_counter_ns() - start, "") + b"\n")
        content = self.cached_body("ollama", model, False)
        conn.stream_now(request, "application/x-ndjson", content + final)
        self.stats.streams += 1

    def paced_ollama(self, model: str, body: dict[str, Any], start: int) -> PacedStream:
        def line(i: int) -> bytes:  # stamped when sent, like an engine's lines
            if i < len(self.pieces):
                return self.ollama_line(model, self.pieces[i], rfc3339(time.time_ns()))
            return self.ollama_final(model, body, time.perf_counter_ns() - start, "") + b"\n"

        return PacedStream(self, self.delays(), len(self.pieces) + 1, line)

    def openai_chat(self, conn: Connection, request: Request) -> None:
        body = self.body_of(conn, request)
        if body is None:
            return
        model = str(body.get("model") or self.options.model)
        created = int(time.time())
        if not body.get("stream"):
            answer = {
                "id": self.new_id().decode(),
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }],
                "usage": self.openai_usage(body),
            }  # fmt: skip
            conn.respond(200, "application/json", _dumps(answer), request.close)
            return
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        tail = self.openai_usage_chunk(model, created, body) if usage else b""
        tail += b"data: [DONE]\n\n"
        ident = self.new_id()
        if self.paced:
            conn.stream_paced(
                request, "text/event-stream", self.paced_openai(model, created, usage, tail, ident)
            )
            return
        content = self.cached_body("openai", model, usage)
        conn.stream_now(request, "text/event-stream", (content + chunk(tail)).replace(ID_SLOT, ident))
        self.stats.streams += 1

    def paced_openai(self, model: str, created: int, usage: bool, tail: bytes, ident: bytes) -> PacedStream:
        first = self.openai_chunk(model, created, {"role": "assistant", "content": ""}, None, usage)
        finish = self.openai_chunk(model, created, {}, "stop", usage)

        def line(i: int) -> bytes:
            if i < len(self.pieces):
                data = self.openai_chunk(model, created, {"content": self.pieces[i]}, None, usage)
                data = first + data if i == 0 else data
            else:
                data = finish + tail
            return data.replace(ID_SLOT, ident)

        return PacedStream(self, self.delays(), len(self.pieces) + 1, line)

    # ---- discovery ----

    def tags(self) -> dict[str, Any]:
        return {"models": [self.model_entry()]}

    def ps(self) -> dict[str, Any]:
        entry = self.model_entry()
        entry.update(
            {"expires_at": "2099-01-01T00:00:00Z", "size_vram": entry["size"], "context_length": 4096}
        )
        return {"models": [entry]}

    def version(self) -> dict[str, Any]:
        return {"version": "0.33.0"}

    def models(self) -> dict[str, Any]:
        name = self.options.model
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": self.started, "owned_by": "library"}],
        }

    def show(self) -> dict[str, Any]:
        entry = self.model_entry()
        return {
            "parameters": "num_ctx 4096",
            "details": entry["details"],
            "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
            "capabilities": ["completion", "tools"],
            "modified_at": entry["modified_at"],
        }

    def stats_json(self) -> dict[str, Any]:
        return self.stats.as_json()

    def model_entry(self) -> dict[str, Any]:
        name = self.options.model
        details = {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        }
        modified = rfc3339(self.started * 1_000_000_000)
        return {
            "name": name,
            "model": name,
            "modified_at": modified,
            "size": 2019393189,
            "digest": "0" * 64,
            "details": details,
        }


GETS: dict[str, Callable[[Mock], dict[str, Any]]] = {
    "/api/tags": Mock.tags,
    "/api/ps": Mock.ps,
    "/api/version": Mock.version,
    "/v1/models": Mock.models,
    "/_mock/stats": Mock.stats_json,
}


@dataclass
class PacedStream:
    """A stream written piece by piece: `line(i)` for i < count, after `delays[i]` for the content pieces."""

    mock: Mock
    delays: list[float]
    count: int
    line: Callable[[int], bytes]


class Connection(asyncio.Protocol):
    """One client connection: parses requests off the buffer and answers them in order."""

    def __init__(self, mock: Mock) -> None:
        self.mock = mock
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None  # a paced stream in progress; parsing waits for it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self.process()

    def process(self) -> None:
        while self.transport is not None and self.task is None:
            request = self.parse()
            if request is None:
                return
            self.mock.handle(self, request)

    def parse(self) -> Request | None:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self.respond(431, "application/json", b'{"error":"headers too large"}', True)
            return None
        try:
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            self.respond(400, "application/json", b'{"error":"bad request line"}', True)
            return None
        length, chunked, close = 0, False, version == "HTTP/1.0"
        for header in lines[1:]:
            name, _, value = header.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value) if value.strip().isdigit() else -1
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                token = value.strip().lower()
                close = token == "close" or (version == "HTTP/1.0" and token != "keep-alive")
        start = end + 4
        if chunked:
            decoded = dechunk(buf, start)
            if decoded is None:
                return None
            body, stop = decoded
        else:
            if length < 0 or length > MAX_BODY:
                self.respond(400, "application/json", b'{"error":"bad content-length"}', True)
                return None
            if len(buf) < start + length:
                return None
            body, stop = bytes(buf[start : start + length]), start + length
        del buf[:stop]
        return Request(method, target, body, close)

    # ---- writing ----

    def head(self, status: int, content_type: str, extra: str, close: bool) -> bytes:
        connection = "Connection: close\r\n" if close else ""
        reason = REASONS.get(status, "Error")
        return (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{extra}{connection}\r\n".encode()
        )

    def respond(
        self, status: int, content_type: str, body: bytes, close: bool, head_only: bool = False
    ) -> None:
        if self.transport is None:
            return
        head = self.head(status, content_type, f"Content-Length: {len(body)}\r\n", close)
        self.transport.write(head if head_only else head + body)
        if close:
            self.transport.close()
            self.transport = None

    def stream_now(self, request: Request, content_type: str, body: bytes) -> None:
        """A whole chunk-framed body at once (`body` must end with its last data chunk)."""
        if self.transport is None:
            return
        head = self.head(200, content_type, "Transfer-Encoding: chunked\r\n", request.close)
        self.transport.write(head + body + b"0\r\n\r\n")
        if request.close:
            self.transport.close()
            self.transport = None

    def stream_paced(self, request: Request, content_type: str, stream: PacedStream) -> None:
        self.task = asyncio.get_running_loop().create_task(self.write_paced(request, content_type, stream))

    async def write_paced(self, request: Request, content_type: str, stream: PacedStream) -> None:
        try:
            if self.transport is None:
                return
            self.transport.write(
                self.head(200, content_type, "Transfer-Encoding: chunked\r\n", request.close)
            )
            for i in range(stream.count):
                if i < len(stream.delays):
                    await asyncio.sleep(stream.delays[i])
                if self.transport is None or self.transport.is_closing():
                    return
                self.transport.write(chunk(stream.line(i)))
            self.transport.write(b"0\r\n\r\n")
            stream.mock.stats.streams += 1
            stream.mock.stats.paced_seconds += sum(stream.delays)
            if request.close:
                self.transport.close()
                self.transport = None
        finally:
            self.task = None
        self.process()  # requests that were pipelined behind this stream


def dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decodes a chunked request body starting at `start`; None while incomplete."""
    out = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0] or b"0", 16)
        pos = eol + 2
        if size == 0:
            trailer = buf.find(b"\r\n", pos)  # no trailers expected: the empty line
            return (bytes(out), trailer + 2) if trailer >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


async def start_server(mock: Mock, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Starts serving `mock` on the running loop; `server.sockets[0].getsockname()[1]` is the port."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Connection(mock), host, port, backlog=1024, reuse_address=True)


async def serve(options: Options, host: str, port: int) -> None:
    server = await start_server(Mock(options), host, port)
    bound = server.sockets[0].getsockname()[1]
    low, high = options.delay
    pacing = f"{low * 1000:g}-{high * 1000:g} ms" if high else "none"
    print(f"mock upstream on http://{host}:{bound} (chunks={options.chunks}, pacing={pacing})", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11500)
    parser.add_argument("--chunks", type=int, default=20, help="content pieces per stream (default 20)")
    parser.add_argument(
        "--delay-ms", default="0", help="delay before each piece: X or a range A-B (default 0)"
    )
    parser.add_argument(
        "--model", default="llama3.2:latest", help="the model that /api/tags and /v1/models list"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed for the delay draws")
    args = parser.parse_args(argv)
    if args.chunks < 1:
        parser.error("--chunks must be at least 1")
    try:
        delay = parse_delay(args.delay_ms)
    except ValueError as exc:
        parser.error(str(exc))
    options = Options(chunks=args.chunks, delay=delay, model=args.model, seed=args.seed)
    try:
        import uvloop  # noqa: PLC0415

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(serve(options, args.host, args.port))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
