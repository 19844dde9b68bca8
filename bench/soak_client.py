"""The soak's requests and its client: the seeded plan, what each request must get, a raw HTTP/1.1
client on keep-alive connections, and the checks that every answer goes through.

`plan` draws the requests (`Spec`) from MIX and FAULTS; `Client` sends them, `concurrency` at a time,
and adds each answer, with what is wrong with it, to a `Tally`. httpx drove only ~150 requests/s
here, at 90% of a core: this client reads status, headers, chunked framing and SSE events itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from faulty_upstream import MODELS as FAULTY_MODELS
from mock_upstream import WORDS

CHUNKS = 20  # content pieces per mock stream
TEXT = "".join(WORDS[i % len(WORDS)] for i in range(CHUNKS))  # what every healthy answer says
PROMPT = "Why is the sky blue?"
MODEL, SLOW_MODEL = "llama3.2", "llama3.2-slow"
MAX_BODY = 256 * 1024  # server.max_body_bytes in the soak's config
OVERSIZED = 300 * 1024
SHORT_TIMEOUTS = {"connect": 1.0, "first_token": 1.0, "idle": 0.5, "total": 10.0}
CALM_TIMEOUTS = {"connect": 1.0, "first_token": 10.0, "idle": 10.0, "total": 30.0}
TIMED_OUT_WITHIN = SHORT_TIMEOUTS["first_token"] + 4.0  # a stall or hang must end this soon
REQUEST_TIMEOUT = 30.0
KEEPALIVE_IDLE = 4.0  # a client connection idle this long is replaced (uvicorn drops them at 5 s)
ERROR_KEYS = {"message", "type", "param", "code"}
CHAT_PATH = "/v1/chat/completions"


# ---- what each request must get ----


@dataclass(frozen=True, slots=True)
class Expected:
    status: int  # 200 when the error comes as an SSE event after the stream started
    error_type: str
    code: str | None = None
    param: str | None = None
    event: bool = False

    def describe(self) -> str:
        what = f"200 + error event {self.error_type}" if self.event else f"{self.status} {self.error_type}"
        return what + (f" {self.code}" if self.code else "")


SERVER_ERROR = "server_error"
BAD = Expected(400, "invalid_request_error")
IN_STREAM = Expected(200, SERVER_ERROR, event=True)
INCOMPLETE = "upstream_incomplete"

# model: (what a non-streaming request may get, what a streaming one may get); the first is the
# rule. The reset and the malformed line come right behind the lines before them (in the same read,
# often): the gateway's HTTP/1.1 client hands over the body it buffered before a reset, and its
# NDJSON decoder yields the lines before a malformed one, so the stream must open and carry them.
# (Through aiohttp, which raised a pending reset first, and the decoder as it was, which parsed a
# whole read before it yielded a line, either could overtake the lines and give 502 or 503.)
FAULTS: dict[str, tuple[tuple[Expected, ...], tuple[Expected, ...]]] = {
    "fault-500": ((Expected(502, SERVER_ERROR),), (Expected(502, SERVER_ERROR),)),
    "fault-429": ((Expected(429, "rate_limit_error"),), (Expected(429, "rate_limit_error"),)),
    "fault-reset": ((Expected(502, SERVER_ERROR),), (IN_STREAM,)),
    "fault-truncated": (
        (Expected(502, SERVER_ERROR, INCOMPLETE),),
        (Expected(200, SERVER_ERROR, INCOMPLETE, event=True),),
    ),
    "fault-malformed": ((Expected(502, SERVER_ERROR),), (IN_STREAM,)),
    # a gateway that gets no CPU for the first-token timeout also times out a stream that sent lines
    "fault-stall": ((Expected(504, SERVER_ERROR),), (IN_STREAM, Expected(504, SERVER_ERROR))),
    "fault-hang": ((Expected(504, SERVER_ERROR),), (Expected(504, SERVER_ERROR),)),
    "fault-refused": ((Expected(503, SERVER_ERROR),), (Expected(503, SERVER_ERROR),)),
}
TIMED_FAULTS = ("fault-stall", "fault-hang")
# backend: its faults and timeouts. Only the faults that a deadline must end get short ones: with
# them everywhere, a gateway that a busy machine leaves without CPU for a second turns a fault
# answered at once (a 500, a truncated stream) into a 504 (seen once in 100k requests).
FAULT_BACKENDS: dict[str, tuple[tuple[str, ...], dict[str, float]]] = {
    "faulty": (tuple(f for f in FAULTS if f not in (*TIMED_FAULTS, "fault-refused")), CALM_TIMEOUTS),
    "stalling": (TIMED_FAULTS, SHORT_TIMEOUTS),
    "refused": (("fault-refused",), SHORT_TIMEOUTS),
}
if set(FAULTS) != {*FAULTY_MODELS, "fault-refused"}:
    raise RuntimeError("FAULTS and the models of bench/faulty_upstream.py differ")

REFUSALS: dict[str, Expected] = {
    "bad-json": BAD,
    "bad-content-type": BAD,
    "bad-field": Expected(400, "invalid_request_error", param="messages[0].role"),
    "n2": Expected(400, "invalid_request_error", param="n"),
    "unknown-model": Expected(404, "invalid_request_error", "model_not_found", "model"),
    "oversized": Expected(413, "invalid_request_error"),
}

# kind: weight among the requests that are not faults
MIX: tuple[tuple[str, int], ...] = (
    ("chat", 34),
    ("stream", 26),
    ("stream-slow", 8),
    ("disconnect", 8),
    ("models", 4),
    ("bad-json", 4),
    ("bad-content-type", 3),
    ("bad-field", 4),
    ("n2", 3),
    ("unknown-model", 4),
    ("oversized", 2),
)
DESCRIBED = {
    "chat": "200, the whole answer",
    "stream": "200, every chunk, [DONE]",
    "stream-slow": "200, every chunk, [DONE]",
    "disconnect": "200, left after 1-5 events",
    "models": "200, the configured names",
    **{kind: expected.describe() for kind, expected in REFUSALS.items()},
}


@dataclass(frozen=True, slots=True)
class Spec:
    """One request of the plan."""

    kind: str  # a MIX kind, or "fault"
    serial: int
    stream: bool = False
    fault: str = ""
    usage: bool = False  # stream_options.include_usage
    leave_after: int = 0  # disconnect: events read before the client goes
    abort: bool = False  # disconnect with a reset rather than a FIN

    @property
    def row(self) -> str:
        if self.fault:
            return f"{self.fault} {'stream' if self.stream else 'plain'}"
        return self.kind

    @property
    def chat(self) -> bool:
        return self.kind != "models"


def plan(seed: int, fault_ratio: float) -> Iterator[Spec]:
    """The endless seeded sequence of requests; a run takes as many as it sends."""
    rng = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    for serial in itertools.count():
        if rng.random() < fault_ratio:
            yield Spec("fault", serial, stream=rng.random() < 0.5, fault=rng.choice(list(FAULTS)))
            continue
        kind = rng.choices(kinds, weights)[0]
        if kind == "disconnect":
            yield Spec(kind, serial, stream=True, leave_after=rng.randint(1, 5), abort=rng.random() < 0.5)
        else:
            usage = kind == "stream" and rng.random() < 1 / 3
            yield Spec(kind, serial, stream=kind in ("stream", "stream-slow"), usage=usage)


def chat_body(model: str, stream: bool, **extra: Any) -> bytes:
    messages = [{"role": "user", "content": PROMPT}]
    return orjson.dumps({"model": model, "messages": messages, "stream": stream, **extra})


def request_of(spec: Spec) -> bytes:
    """The request's bytes, head and body."""
    content_type, body = "application/json", b""
    if spec.kind == "models":
        return b"GET /v1/models HTTP/1.1\r\nHost: soak\r\n\r\n"
    if spec.fault:
        body = chat_body(spec.fault, spec.stream)
    elif spec.kind in ("chat", "stream"):
        extra = {"stream_options": {"include_usage": True}} if spec.usage else {}
        body = chat_body(MODEL, spec.stream, **extra)
    elif spec.kind in ("stream-slow", "disconnect"):
        body = chat_body(SLOW_MODEL, True)
    elif spec.kind == "bad-json":
        body = chat_body(MODEL, False)[:-9]
    elif spec.kind == "bad-content-type":
        content_type, body = "text/plain", chat_body(MODEL, False)
    elif spec.kind == "bad-field":
        body = orjson.dumps({"model": MODEL, "messages": [{"role": "robot", "content": PROMPT}]})
    elif spec.kind == "n2":
        body = chat_body(MODEL, False, n=2)
    elif spec.kind == "unknown-model":
        body = chat_body(f"no-such-model-{spec.serial}", False)  # new names must not grow anything
    elif spec.kind == "oversized":
        body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * OVERSIZED}]})
    head = f"POST {CHAT_PATH} HTTP/1.1\r\nHost: soak\r\nContent-Type: {content_type}\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


# ---- the client ----


class ProtocolError(Exception):
    """The gateway's bytes are not the HTTP/1.1 this client expects."""


TRANSPORT_ERRORS = (
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ValueError,
    ProtocolError,
)


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    events: list[bytes] = field(default_factory=list)  # `data:` payloads of an SSE stream
    ended: bool = False  # the body was read to its end


class SSEDecoder:
    """The `data:` payloads of complete events (lines end in LF or CRLF; a blank line ends an event)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        events = []
        for raw in lines:
            text = raw.removesuffix(b"\r")
            if not text:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif text.startswith(b"data:"):
                self._data.append(text[5:].removeprefix(b" "))
        return events


class Connection:
    """One keep-alive HTTP/1.1 connection to the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False
        self.used_at = time.monotonic()

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer)

    @property
    def stale(self) -> bool:
        return self.closed or time.monotonic() - self.used_at > KEEPALIVE_IDLE

    def close(self, *, abort: bool = False) -> None:
        if not self.closed:
            self.closed = True
            if abort:
                self.writer.transport.abort()
            else:
                self.writer.close()

    async def send(self, data: bytes, *, tolerant: bool = False) -> None:
        """`tolerant`: the server may answer and close before it has read everything (a 413)."""
        self.writer.write(data)
        try:
            await self.writer.drain()
        except ConnectionError:
            if not tolerant:
                raise

    async def head(self) -> tuple[int, dict[str, str]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line!r}")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def pieces(self, headers: dict[str, str]) -> AsyncGenerator[bytes, None]:
        """The body as it arrives, chunk by chunk (or whole, by Content-Length)."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    if await self.reader.readuntil(b"\r\n") != b"\r\n":
                        raise ProtocolError("trailers after the last chunk")
                    return
                data = await self.reader.readexactly(size + 2)
                if not data.endswith(b"\r\n"):
                    raise ProtocolError("a chunk without its CRLF")
                yield data[:-2]
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length:
                yield await self.reader.readexactly(length)
        else:
            raise ProtocolError("a response with neither Content-Length nor chunked framing")


async def perform(conn: Connection, spec: Spec) -> Reply:
    """Sends `spec` and reads its answer (for `disconnect`, only as far as the client stays)."""
    await conn.send(request_of(spec), tolerant=spec.kind == "oversized")
    status, headers = await conn.head()
    reply = Reply(status, headers)
    decoder = SSEDecoder() if headers.get("content-type", "").startswith("text/event-stream") else None
    body = bytearray()
    async with contextlib.aclosing(conn.pieces(headers)) as pieces:
        async for piece in pieces:
            if decoder is None:
                body += piece
                continue
            reply.events += decoder.feed(piece)
            if spec.leave_after and len(reply.events) >= spec.leave_after:
                conn.close(abort=spec.abort)
                return reply
    reply.body, reply.ended = bytes(body), True
    conn.used_at = time.monotonic()
    if headers.get("connection", "").lower() == "close" or spec.kind == "oversized":
        conn.close()
    return reply


# ---- checking answers ----


def error_problem(reply: Reply, expected: Expected) -> str | None:
    """What is wrong with an error answer (None when it is what `expected` says)."""
    if reply.status != expected.status:
        return f"status {reply.status}, expected {expected.status}"
    if not reply.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {reply.headers.get('content-type')!r}"
    body = orjson.loads(reply.body)
    problem = shape_problem(body, expected)
    if problem is None and expected.status == 429 and reply.headers.get("retry-after") != "7":
        problem = f"retry-after {reply.headers.get('retry-after')!r}, expected '7' from the upstream"
    return problem


def shape_problem(body: Any, expected: Expected) -> str | None:
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"not OpenAI's error shape: {str(body)[:200]}"
    error = body["error"]
    if set(error) != ERROR_KEYS:
        return f"error keys {sorted(error)}"
    for key in ("type", "code", "param"):
        want = expected.error_type if key == "type" else getattr(expected, key)
        if want is not None and error[key] != want:
            return f"error {key} {error[key]!r}, expected {want!r}"
    return None


def event_problem(reply: Reply, expected: Expected) -> str | None:
    """A stream that started, then carried one error event as its last event, and ended."""
    if reply.status != 200:
        return f"status {reply.status}, expected 200 and an error event"
    if not reply.ended:
        return "the stream did not end after its error event"
    if not reply.events or b"[DONE]" in reply.events:
        return f"{len(reply.events)} events, [DONE] among them: {b'[DONE]' in reply.events}"
    chunks = [orjson.loads(event) for event in reply.events]
    if any("error" in chunk for chunk in chunks[:-1]):
        return "an error event before the last event"
    return shape_problem(chunks[-1], expected)


def completion_problem(reply: Reply) -> str | None:
    if reply.status != 200:
        return f"status {reply.status}: {reply.body[:200]!r}"
    body = orjson.loads(reply.body)
    choice = body["choices"][0]
    if body["object"] != "chat.completion" or len(body["choices"]) != 1:
        return f"object {body['object']!r} with {len(body['choices'])} choices"
    if choice["message"]["content"] != TEXT or choice["finish_reason"] != "stop":
        return f"content {choice['message']['content']!r}, finish {choice['finish_reason']!r}"
    if body["usage"]["completion_tokens"] != CHUNKS:
        return f"usage {body['usage']}"
    return None


def stream_problem(reply: Reply, usage: bool) -> str | None:
    if reply.status != 200 or not reply.headers.get("content-type", "").startswith("text/event-stream"):
        return (
            f"status {reply.status}, content-type {reply.headers.get('content-type')!r}: {reply.body[:200]!r}"
        )
    if not reply.ended or not reply.events or reply.events[-1] != b"[DONE]":
        return f"ended {reply.ended}, last event {reply.events[-1][:200] if reply.events else None!r}"
    chunks = [orjson.loads(event) for event in reply.events[:-1]]
    if any("error" in chunk for chunk in chunks):
        return "an error event in a healthy stream"
    if len({chunk["id"] for chunk in chunks}) != 1:
        return "more than one id in one stream"
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    text = "".join(choice["delta"].get("content") or "" for choice in choices)
    finishes = [choice["finish_reason"] for choice in choices if choice["finish_reason"]]
    if text != TEXT or finishes != ["stop"]:
        return f"text {text!r}, finish reasons {finishes}"
    if usage and (chunks[-1]["choices"] or chunks[-1]["usage"]["completion_tokens"] != CHUNKS):
        return f"usage chunk {chunks[-1]}"
    return None


def left_problem(reply: Reply, spec: Spec) -> str | None:
    if reply.status != 200 or len(reply.events) < spec.leave_after:
        return f"status {reply.status}, {len(reply.events)} events before leaving"
    chunks = [orjson.loads(event) for event in reply.events]
    if any("error" in chunk for chunk in chunks):
        return "an error event before the client left"
    return None


def models_problem(reply: Reply) -> str | None:
    if reply.status != 200:
        return f"status {reply.status}"
    body = orjson.loads(reply.body)
    missing = {MODEL, SLOW_MODEL, *FAULTS} - {entry["id"] for entry in body["data"]}
    if body["object"] != "list" or missing:
        return f"object {body['object']!r}, missing {sorted(missing)}"
    return None


def outcome_of(reply: Reply) -> str:
    """A short name for what came back, for the outcome table."""
    if reply.events:
        last = reply.events[-1]
        if last == b"[DONE]":
            return "200 [DONE]"
        if last.startswith(b'{"error"'):
            return "200 + error event"
        return "200, left mid-stream" if not reply.ended else "200, no [DONE]"
    with contextlib.suppress(ValueError, TypeError, KeyError):
        error = orjson.loads(reply.body)["error"]
        return f"{reply.status} {error['type']}" + (f" {error['code']}" if error.get("code") else "")
    return str(reply.status)


def problem_of(spec: Spec, reply: Reply, seconds: float) -> str | None:
    """What is wrong with `reply` as the answer to `spec`; None when it is what it must be."""
    try:
        if spec.fault:
            allowed = FAULTS[spec.fault][spec.stream]
            problems = [(event_problem if e.event else error_problem)(reply, e) for e in allowed]
            if all(problems):
                return problems[0]
            if spec.fault in TIMED_FAULTS and seconds > TIMED_OUT_WITHIN:
                return f"answered after {seconds:.1f} s; the timeouts allow {TIMED_OUT_WITHIN:g}"
            return None
        if spec.kind in REFUSALS:
            return error_problem(reply, REFUSALS[spec.kind])
        if spec.kind == "chat":
            return completion_problem(reply)
        if spec.kind in ("stream", "stream-slow"):
            return stream_problem(reply, spec.usage)
        if spec.kind == "disconnect":
            return left_problem(reply, spec)
        return models_problem(reply)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        return f"unreadable answer ({type(error).__name__}: {error}): {reply.body[:200]!r}"


@dataclass
class Tally:
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)  # row -> outcome -> count
    unexpected: Counter[str] = field(default_factory=Counter)  # row -> count
    examples: list[str] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    done: int = 0
    chat_posts: int = 0  # requests that reached POST /v1/chat/completions

    def add(self, spec: Spec, outcome: str, problem: str | None, seconds: float) -> None:
        self.done += 1
        self.chat_posts += spec.chat
        self.outcomes.setdefault(spec.row, Counter())[outcome] += 1
        self.seconds.setdefault(spec.row, []).append(seconds)
        if problem is not None:
            self.unexpected[spec.row] += 1
            if len(self.examples) < 10:
                self.examples.append(f"request #{spec.serial}, {spec.row}: {outcome}: {problem}")


class Client:
    """Sends specs, `concurrency` at a time, each worker on a keep-alive connection of its own."""

    def __init__(self, port: int, tally: Tally, deadline: float) -> None:
        self.port = port
        self.tally = tally
        self.deadline = deadline
        self.cut_short = False

    async def run(self, specs: Iterator[Spec], count: int, concurrency: int) -> None:
        batch = itertools.islice(specs, count)
        await asyncio.gather(*(self._worker(batch) for _ in range(concurrency)))

    async def _worker(self, specs: Iterator[Spec]) -> None:
        conn: Connection | None = None
        for spec in specs:
            if time.monotonic() > self.deadline:
                self.cut_short = True
                break
            started = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    if conn is None or conn.stale:
                        if conn is not None:
                            conn.close()
                        conn = await Connection.open(self.port)
                    reply = await perform(conn, spec)
            except TimeoutError:
                outcome, problem = "client timeout", f"no answer within {REQUEST_TIMEOUT:g} s"
            except TRANSPORT_ERRORS as error:
                outcome, problem = "transport error", f"{type(error).__name__}: {error}"
            else:
                seconds = time.perf_counter() - started
                self.tally.add(spec, outcome_of(reply), problem_of(spec, reply, seconds), seconds)
                continue
            if conn is not None:
                conn.close(abort=True)
                conn = None
            self.tally.add(spec, outcome, problem, time.perf_counter() - started)
        if conn is not None:
            conn.close()
