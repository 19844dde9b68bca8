"""A soak: 100k mixed requests through the gateway, faults sprinkled in, memory and descriptors watched.

Starts, each as its own process on a free loopback port: the fast mock (`bench/mock_upstream.py`), a
paced one (tokens every 1-4 ms, so that clients can leave in the middle of a stream), two instances
of a misbehaving Ollama that this script serves itself (`--faulty-upstream`), and the gateway
(`python -m gateway serve`) with a config written to a temporary directory. A raw-asyncio HTTP/1.1
client (httpx drove only ~150 requests/s here, at 90% of a core) sends `--requests` requests,
`--concurrency` at a time on keep-alive connections, drawn from a seeded mix; every answer is
checked against what that request must get:

    chat                non-streaming chat on the fast mock       200 and the whole answer
    stream              streaming chat (a third with usage)        200, every chunk, then [DONE]
    stream-slow         streaming chat on the paced mock           200, every chunk, then [DONE]
    disconnect          paced stream; the client leaves after 1-5 events (FIN or RST)
    models              GET /v1/models                             200 and the configured names
    bad-json, bad-content-type, bad-field, n2                      400 in OpenAI's error shape
    unknown-model       a new unknown name each time               404 model_not_found
    oversized           a body past server.max_body_bytes          413
    fault-* (`--fault-ratio`, 5% by default, half streamed; the model name picks the fault; one
    instance each, `routing.retries: 0`; stall and hang on a backend with timeouts of 1 s for the
    first token and 0.5 s between chunks, the others with 10 s):
      fault-500         the upstream answers 500                   502
      fault-429         429 with Retry-After: 7                    429 and Retry-After: 7
      fault-reset       TCP reset after 3 NDJSON lines             stream: SSE error event; else 502
      fault-truncated   the stream ends without `done: true`       stream: SSE error event; else 502
                                                                   (both with code upstream_incomplete)
      fault-malformed   a line (or a body) that is not JSON        stream: SSE error event; else 502
      fault-stall       1.5 s of silence after 3 lines             stream: SSE error event; else 504
      fault-hang        no answer at all                           504 after the first-token timeout
      fault-refused     a port where nothing listens               503

A stream's error event must be the last event, with no [DONE], and the response must end (a reset
or a malformed line that overtakes the lines before it, or a gateway starved of CPU, may also give
502, 503 or 504: see FAULTS).

The gateway's processes are sampled every 0.5 s (VmRSS, open descriptors); at the start (after
`--warmup` requests), at the end and after `--idle` seconds of quiet (aiohttp closes upstream
connections idle for 15 s, checking every 15 s), the script also counts the gateway's TCP connections
per upstream. The exit status is 1 on any unexpected answer, a Traceback or an error-level line in
the gateway's log, an in-flight gauge not back at 0, a chat request the gateway did not count,
descriptors growing, a client connection left open, or requests left unsent at `--max-seconds`.

    .venv/bin/python bench/soak.py --quick                  # 5,000 requests, about a minute
    .venv/bin/python bench/soak.py [--requests 100000] [--concurrency 32] [--fault-ratio 0.05]
        [--seed 1] [--workers 1] [--max-seconds 1200] [--json FILE]

Pinned with taskset when there are two cores (`--no-pin` to leave it): the gateway on core 1, the
client, the upstreams and this driver on core 0. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from mock_upstream import WORDS  # noqa: E402

LOAD_CPU, GATEWAY_CPU, BOTH_CPUS = "0", "1", "0,1"
CHUNKS = 20  # content pieces per mock stream
TEXT = "".join(WORDS[i % len(WORDS)] for i in range(CHUNKS))  # what every healthy answer says
PROMPT = "Why is the sky blue?"
MODEL, SLOW_MODEL = "llama3.2", "llama3.2-slow"
SLOW_DELAY_MS = "1-4"
MAX_BODY = 256 * 1024  # server.max_body_bytes in the soak's config
OVERSIZED = 300 * 1024
SHORT_TIMEOUTS = {"connect": 1.0, "first_token": 1.0, "idle": 0.5, "total": 10.0}
CALM_TIMEOUTS = {"connect": 1.0, "first_token": 10.0, "idle": 10.0, "total": 30.0}
FAULT_LINES = ("The", " sky", " is")  # what a faulty stream sends before it misbehaves
STALL_SECONDS = 1.5  # longer than the idle timeout
HANG_SECONDS = 5.0  # the faulty upstream gives up on a client that waits this long
LATE_FAULT_AFTER = 0.2  # seconds between the first lines and a reset or a malformed line (see FAULTS)
TIMED_OUT_WITHIN = SHORT_TIMEOUTS["first_token"] + 4.0  # a stall or hang must end this soon
REQUEST_TIMEOUT = 30.0
KEEPALIVE_IDLE = 4.0  # a client connection idle this long is replaced (uvicorn drops them at 5 s)
SAMPLE_EVERY = 0.5
FD_SLACK = 16  # descriptors after the idle wait may exceed those at the start by this many
ERROR_KEYS = {"message", "type", "param", "code"}
CHAT_PATH = "/v1/chat/completions"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Failure(Exception):
    """Stops the run with a message (no traceback)."""


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
# rule. A reset or a malformed line comes LATE_FAULT_AFTER s after the lines before it, so that the
# gateway has relayed them: aiohttp raises a pending reset before it hands over what it buffered,
# and the gateway's NDJSON decoder parses a whole read before it yields a line, so a gateway that
# read nothing for that long meets the fault before the first chunk (502; a reset before the head:
# 503). Those are defined outcomes too, counted apart in the table.
FAULTS: dict[str, tuple[tuple[Expected, ...], tuple[Expected, ...]]] = {
    "fault-500": ((Expected(502, SERVER_ERROR),), (Expected(502, SERVER_ERROR),)),
    "fault-429": ((Expected(429, "rate_limit_error"),), (Expected(429, "rate_limit_error"),)),
    "fault-reset": (
        (Expected(502, SERVER_ERROR), Expected(503, SERVER_ERROR)),
        (IN_STREAM, Expected(502, SERVER_ERROR), Expected(503, SERVER_ERROR)),
    ),
    "fault-truncated": (
        (Expected(502, SERVER_ERROR, INCOMPLETE),),
        (Expected(200, SERVER_ERROR, INCOMPLETE, event=True),),
    ),
    "fault-malformed": ((Expected(502, SERVER_ERROR),), (IN_STREAM, Expected(502, SERVER_ERROR))),
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
FAULTY_MODELS = tuple(name for name in FAULTS if name != "fault-refused")  # the faulty upstream's

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


# ---- the misbehaving upstream (`--faulty-upstream`) ----

REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}
NDJSON = "application/x-ndjson"
LAST_CHUNK = b"0\r\n\r\n"


def ndjson_line(model: str, content: str, *, done: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "created_at": "2026-01-01T00:00:00.000000001Z",
        "message": {"role": "assistant", "content": content},
        "done": done,
    }
    if done:
        body |= {
            "done_reason": "stop",
            "total_duration": 1000,
            "load_duration": 10,
            "prompt_eval_count": 3,
            "prompt_eval_duration": 100,
            "eval_count": len(FAULT_LINES),
            "eval_duration": 200,
        }
    return orjson.dumps(body) + b"\n"


def response_head(
    status: int, *, length: int | None = None, content_type: str = "application/json", extra: str = ""
) -> bytes:
    """A response head; chunked when `length` is None."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    reason = REASONS.get(status, "Status")
    return f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{framing}\r\n{extra}\r\n".encode()


def json_reply(status: int, body: Any, extra: str = "", *, head_only: bool = False) -> bytes:
    data = orjson.dumps(body)
    head = response_head(status, length=len(data), extra=extra)
    return head if head_only else head + data


def framed(line: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(line), line)


def first_lines(model: str) -> bytes:
    """A stream's head and its first lines, all well-formed."""
    lines = b"".join(framed(ndjson_line(model, word)) for word in FAULT_LINES)
    return response_head(200, content_type=NDJSON) + lines


def whole_answer(model: str, *, done: bool = True) -> bytes:
    """A non-streaming answer (Ollama's final object with the whole text)."""
    body = orjson.loads(ndjson_line(model, "", done=True))
    body["message"]["content"], body["done"] = "".join(FAULT_LINES), done
    return orjson.dumps(body)


@dataclass
class Peer:
    """The gateway's end of one connection to the faulty upstream."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def pause(self, seconds: float) -> bool:
        """Waits `seconds` unless the client goes away first (it sends nothing while it waits for
        its answer); False when it went away."""
        try:
            async with asyncio.timeout(seconds):
                await self.reader.read(1)
        except TimeoutError:
            return True
        except ConnectionError:
            return False
        return False  # end of stream, or bytes a waiting client does not send

    def reset(self) -> None:
        """Aborts the connection with a TCP RST (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Fault = Callable[[Peer, str, bool], Awaitable[bool]]


class FaultyOllama:
    """An Ollama whose `/api/chat` misbehaves as the model's name says. `/api/version`, `/api/tags`,
    `/api/ps` and `/api/show` answer well, so that the gateway's probes keep it healthy. A fault
    returns whether the connection can serve another request."""

    def __init__(self) -> None:
        self.faults: dict[str, Fault] = {
            "fault-500": self.status_500,
            "fault-429": self.status_429,
            "fault-reset": self.reset,
            "fault-truncated": self.truncated,
            "fault-malformed": self.malformed,
            "fault-stall": self.stall,
            "fault-hang": self.hang,
        }
        assert set(self.faults) == set(FAULTY_MODELS)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        try:
            while await self.one(peer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the gateway closed the connection, or sent what this server does not parse
        finally:
            writer.close()

    async def one(self, peer: Peer) -> bool:
        head = await peer.reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        length = 0
        for line in lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await peer.reader.readexactly(length) if length else b""
        if (method, path) == ("POST", "/api/chat"):
            return await self.chat(peer, body)
        status, answer = self.static(path)
        await peer.send(json_reply(status, answer, head_only=method == "HEAD"))
        return True

    @staticmethod
    def static(path: str) -> tuple[int, Any]:
        if path == "/api/version":
            return 200, {"version": "0.5.4"}
        if path == "/api/tags":
            details = {"format": "gguf", "family": "llama", "parameter_size": "3.2B"}
            entry = {"size": 1, "digest": "0" * 64, "modified_at": "2026-01-01T00:00:00Z", "details": details}
            models = [
                {"name": f"{name}:latest", "model": f"{name}:latest", **entry} for name in FAULTY_MODELS
            ]
            return 200, {"models": models}
        if path == "/api/ps":
            return 200, {"models": []}
        if path == "/api/show":
            return 200, {"parameters": "num_ctx 4096", "details": {}, "model_info": {}}
        return 404, {"error": "404 page not found"}

    async def chat(self, peer: Peer, body: bytes) -> bool:
        request = orjson.loads(body)
        model = str(request.get("model", "")).removesuffix(":latest")
        fault = self.faults.get(model)
        if fault is None:
            await peer.send(json_reply(404, {"error": f"model '{model}' not found"}))
            return True
        return await fault(peer, model, request.get("stream", True) is not False)

    async def status_500(self, peer: Peer, model: str, stream: bool) -> bool:
        await peer.send(json_reply(500, {"error": "llama runner process has terminated: exit status 2"}))
        return True

    async def status_429(self, peer: Peer, model: str, stream: bool) -> bool:
        busy = {"error": "server busy, please try again.  maximum pending requests exceeded"}
        await peer.send(json_reply(429, busy, "Retry-After: 7\r\n"))
        return True

    async def reset(self, peer: Peer, model: str, stream: bool) -> bool:
        if stream:
            await peer.send(first_lines(model))
        else:
            whole = whole_answer(model)
            await peer.send(response_head(200, length=len(whole)) + whole[: len(whole) // 2])
        await peer.pause(LATE_FAULT_AFTER)  # time for the gateway to read what came first
        peer.reset()
        return False

    async def truncated(self, peer: Peer, model: str, stream: bool) -> bool:
        if stream:
            await peer.send(first_lines(model) + LAST_CHUNK)
        else:
            whole = whole_answer(model, done=False)
            await peer.send(response_head(200, length=len(whole)) + whole)
        return True

    async def malformed(self, peer: Peer, model: str, stream: bool) -> bool:
        garbage = b"<html><body>502 Bad Gateway</body></html>\n"
        if stream:
            await peer.send(first_lines(model))
            if not await peer.pause(LATE_FAULT_AFTER):  # time for the gateway to read what came first
                return False
            await peer.send(framed(garbage) + framed(ndjson_line(model, "", done=True)) + LAST_CHUNK)
        else:
            await peer.send(response_head(200, length=len(garbage)) + garbage)
        return True

    async def stall(self, peer: Peer, model: str, stream: bool) -> bool:
        if stream:
            await peer.send(first_lines(model))
            rest = framed(ndjson_line(model, "", done=True)) + LAST_CHUNK
        else:
            whole = whole_answer(model)
            await peer.send(response_head(200, length=len(whole)) + whole[: len(whole) // 2])
            rest = whole[len(whole) // 2 :]
        if not await peer.pause(STALL_SECONDS):
            return False
        await peer.send(rest)
        return True

    async def hang(self, peer: Peer, model: str, stream: bool) -> bool:
        await peer.pause(HANG_SECONDS)
        return False


async def serve_faulty(port: int) -> None:
    server = await asyncio.start_server(FaultyOllama().serve, "127.0.0.1", port, backlog=1024)
    print(f"faulty upstream on http://127.0.0.1:{port} ({', '.join(FAULTY_MODELS)})", flush=True)
    async with server:
        await server.serve_forever()


# ---- processes ----


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Processes:
    """Everything the soak starts, each in its own session, stopped by its own process group."""

    def __init__(self, workdir: Path, pin: bool) -> None:
        self.workdir = workdir
        self.pin = pin
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], cpus: str, env: dict[str, str] | None = None) -> Proc:
        command = ["taskset", "-c", cpus, *argv] if self.pin else list(argv)  # taskset execs: same pid
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):  # stragglers in the group (uvicorn workers)
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fetch(url: str, timeout: float = 5.0) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    with opener.open(url, timeout=timeout) as response:
        data: bytes = response.read()
        return data


def wait_http(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise Failure(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError):
            fetch(url, timeout=2)
            return
        time.sleep(0.1)
    raise Failure(f"{proc.name} did not answer {url} within {timeout:.0f} s:\n{proc.tail()}")


@dataclass
class Rig:
    procs: Processes
    gateway: Proc
    gateway_port: int
    upstreams: dict[int, str]  # port -> backend name
    refused: socket.socket  # bound, never listening: connecting to it is refused

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"


def write_config(path: Path, ports: dict[str, int]) -> None:
    url = "http://127.0.0.1:{}".format
    backends, faults = "", ""
    for backend, (names, timeouts) in FAULT_BACKENDS.items():
        limits = "{" + ", ".join(f"{k}: {v:g}" for k, v in timeouts.items()) + "}"
        backends += (
            f'  - {{name: {backend}, type: ollama, base_url: "{url(ports[backend])}", timeouts: {limits}}}\n'
        )
        faults += "".join(
            f'  - {{name: {n}, deployments: [{{backend: {backend}, model: "{n}"}}]}}\n' for n in names
        )
    path.write_text(f"""\
server: {{host: 127.0.0.1, max_body_bytes: {MAX_BODY}}}
backends:
  - {{name: mock, type: ollama, base_url: "{url(ports["mock"])}"}}
  - {{name: mock-slow, type: ollama, base_url: "{url(ports["mock-slow"])}"}}
{backends}models:
  - {{name: {MODEL}, deployments: [{{backend: mock, model: "{MODEL}"}}]}}
  - {{name: {SLOW_MODEL}, deployments: [{{backend: mock-slow, model: "{MODEL}"}}]}}
{faults}routing: {{retries: 0}}
""")


def start_rig(args: argparse.Namespace, workdir: Path, procs: Processes) -> Rig:
    python, mock = sys.executable, str(BENCH / "mock_upstream.py")
    ports = {name: free_port() for name in ("mock", "mock-slow", "faulty", "stalling", "gateway")}
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    ports["refused"] = refused.getsockname()[1]
    chunks = ["--chunks", str(CHUNKS)]
    started = [
        procs.start("mock", [python, mock, "--port", str(ports["mock"]), *chunks], LOAD_CPU),
        procs.start(
            "mock-slow",
            [python, mock, "--port", str(ports["mock-slow"]), *chunks, "--delay-ms", SLOW_DELAY_MS],
            LOAD_CPU,
        ),
        *(
            procs.start(name, [python, __file__, "--faulty-upstream", "--port", str(ports[name])], LOAD_CPU)
            for name in ("faulty", "stalling")
        ),
    ]
    for proc in started:
        wait_http(proc, f"http://127.0.0.1:{ports[proc.name]}/api/version", 20)
    config = workdir / "gateway.yaml"
    write_config(config, ports)
    argv = [python, "-m", "gateway", "serve", "--config", str(config), "--port", str(ports["gateway"])]
    argv += ["--workers", str(args.workers), "--log-level", args.log_level]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    gateway = procs.start("gateway", argv, GATEWAY_CPU if args.workers == 1 else BOTH_CPUS, env)
    rig = Rig(procs, gateway, ports["gateway"], {ports[n]: n for n in ports if n != "gateway"}, refused)
    wait_http(gateway, rig.url + "/healthz", 60)
    if args.workers > 1:
        time.sleep(2)  # every worker up, not just the first to answer
    return rig


# ---- what /proc says about the gateway ----

TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree += children
        frontier += children
    return tree


def status_kb(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def fd_targets(pid: int) -> list[str]:
    targets = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def tcp_sockets(pid: int) -> dict[str, tuple[int, int, str]]:
    """inode -> (local port, remote port, state), from the process's network namespace."""
    table = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
                cols = line.split()
                local, remote = int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)
                table[cols[9]] = (local, remote, TCP_STATES.get(cols[3], cols[3]))
    return table


@dataclass
class Reading:
    """The gateway's processes at one moment."""

    rss_kb: int
    hwm_kb: int
    fds: int
    connections: dict[str, dict[str, int]]  # upstream name, or "clients" -> TCP state -> count


def read_gateway(rig: Rig) -> Reading:
    pids = process_tree(rig.gateway.pid)
    sockets = tcp_sockets(rig.gateway.pid)
    connections: dict[str, Counter[str]] = {name: Counter() for name in rig.upstreams.values()}
    connections["clients"] = Counter()
    fds = 0
    for pid in pids:
        targets = fd_targets(pid)
        fds += len(targets)
        for target in targets:
            found = sockets.get(target.removeprefix("socket:[").removesuffix("]"))
            if found is None:
                continue
            local, remote, state = found
            if remote in rig.upstreams:
                connections[rig.upstreams[remote]][state] += 1
            elif local == rig.gateway_port and state != "LISTEN":
                connections["clients"][state] += 1
    return Reading(
        rss_kb=sum(status_kb(pid, "VmRSS") for pid in pids),
        hwm_kb=sum(status_kb(pid, "VmHWM") for pid in pids),
        fds=fds,
        connections={name: dict(states) for name, states in connections.items()},
    )


@dataclass(frozen=True, slots=True)
class Sample:
    seconds: float
    requests: int
    rss_kb: int
    fds: int


async def sample_forever(rig: Rig, tally: Tally, samples: list[Sample], started: float) -> None:
    pids, refreshed = process_tree(rig.gateway.pid), time.monotonic()
    last_log = started
    while True:
        now = time.monotonic()
        if now - refreshed > 10:
            pids, refreshed = process_tree(rig.gateway.pid), now
        rss = sum(status_kb(pid, "VmRSS") for pid in pids)
        samples.append(Sample(round(now - started, 2), tally.done, rss, fd_count(pids)))
        if now - last_log >= 10:
            last_log = now
            bad = sum(tally.unexpected.values())
            log(
                f"  {now - started:6.0f} s  {tally.done:>8,} requests  RSS {rss / 1024:6.1f} MB  "
                f"fds {samples[-1].fds:4}  unexpected {bad}"
            )
        await asyncio.sleep(SAMPLE_EVERY)


# ---- the gateway's own view ----

METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in fetch(url + "/metrics").decode().splitlines():
        match = METRIC_LINE.match(line)
        if match and not line.startswith("#"):
            samples.append((match[1], dict(LABEL.findall(match[2] or "")), float(match[3])))
    return samples


@dataclass
class GatewayView:
    inflight: dict[str, float]
    chat_statuses: dict[str, int]  # status -> requests the gateway counted on the chat endpoint
    upstream_errors: dict[str, int]  # "backend/reason" -> count

    @property
    def chat_total(self) -> int:
        return sum(self.chat_statuses.values())


def gateway_view(url: str) -> GatewayView:
    view = GatewayView({}, {}, {})
    for name, labels, value in scrape(url):
        if name == "gateway_inflight_requests":
            view.inflight[labels["backend"]] = value
        elif name == "gateway_requests_total" and labels.get("endpoint") == "chat":
            view.chat_statuses[labels["status"]] = view.chat_statuses.get(labels["status"], 0) + int(value)
        elif name == "gateway_upstream_errors_total":
            view.upstream_errors[f"{labels['backend']}/{labels['reason']}"] = int(value)
    return view


async def settle(rig: Rig, tally: Tally, limit: float = 15.0) -> tuple[GatewayView, float]:
    """Waits until nothing is in flight and every chat request sent is counted (or `limit` s)."""
    started = time.monotonic()
    while True:
        view = await asyncio.to_thread(gateway_view, rig.url)
        quiet = not any(view.inflight.values()) and view.chat_total >= tally.chat_posts
        if quiet or time.monotonic() - started > limit:
            return view, time.monotonic() - started
        await asyncio.sleep(0.2)


@dataclass
class LogScan:
    lines: int = 0
    tracebacks: int = 0
    errors: int = 0  # error-level lines: the gateway's own bugs ("internal error")
    warnings: int = 0
    examples: list[str] = field(default_factory=list)


def scan_log(path: Path) -> LogScan:
    scan = LogScan()
    with open(path, errors="replace") as lines:
        for line in lines:
            scan.lines += 1
            bad = "Traceback" in line
            scan.tracebacks += bad
            if '"level":"error"' in line or '"level":"critical"' in line or line.startswith("ERROR"):
                scan.errors += 1
                bad = True
            scan.warnings += '"level":"warning"' in line
            if bad and len(scan.examples) < 5:
                scan.examples.append(line.rstrip()[:400])
    return scan


# ---- the run ----


@dataclass
class Results:
    args: dict[str, Any]
    machine: str
    requests: int = 0
    warmup: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    start: Reading | None = None
    end: Reading | None = None
    idle: Reading | None = None
    peak_rss_kb: int = 0
    peak_fds: int = 0
    settle_seconds: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    view: GatewayView | None = None
    log: LogScan = field(default_factory=LogScan)
    cut_short: bool = False
    problems: list[str] = field(default_factory=list)


async def soak(args: argparse.Namespace, rig: Rig, results: Results) -> None:
    tally = results.tally
    specs = plan(args.seed, args.fault_ratio)
    began = time.monotonic()
    client = Client(rig.gateway_port, tally, began + args.max_seconds)
    sampler = asyncio.create_task(sample_forever(rig, tally, results.samples, began))
    try:
        log(f"warm-up: {args.warmup:,} requests")
        await client.run(specs, args.warmup, args.concurrency)
        results.warmup = tally.done
        await settle(rig, tally)
        results.start = read_gateway(rig)
        log(
            f"soak: {args.requests:,} requests, {args.concurrency} at a time (at most {args.max_seconds:g} s)"
        )
        started = time.monotonic()
        await client.run(specs, args.requests, args.concurrency)
        results.seconds = time.monotonic() - started
        results.requests = tally.done - results.warmup
        results.rate = results.requests / results.seconds if results.seconds else 0.0
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    results.cut_short = client.cut_short
    results.view, results.settle_seconds = await settle(rig, tally)
    results.end = read_gateway(rig)
    if args.idle:
        log(f"idle for {args.idle:g} s (the upstream keep-alive pool closes idle connections in 15-30 s)")
        await asyncio.sleep(args.idle)
        results.idle = read_gateway(rig)
    results.peak_rss_kb = max([s.rss_kb for s in results.samples] + [results.end.rss_kb])
    results.peak_fds = max([s.fds for s in results.samples] + [results.end.fds])


def verdict(args: argparse.Namespace, results: Results) -> None:
    problems, tally, view = results.problems, results.tally, results.view
    if bad := sum(tally.unexpected.values()):
        problems.append(f"{bad} unexpected answer(s)")
    if results.cut_short:
        problems.append(f"the time limit ({args.max_seconds:g} s) stopped the run at {tally.done:,} requests")
    if view is not None:
        if stuck := {name: value for name, value in view.inflight.items() if value}:
            problems.append(f"gateway_inflight_requests not back at 0: {stuck}")
        if view.chat_total != tally.chat_posts:
            problems.append(
                f"the gateway counted {view.chat_total:,} chat requests; {tally.chat_posts:,} were sent"
            )
    if results.log.tracebacks or results.log.errors:
        problems.append(
            f"gateway log: {results.log.tracebacks} Traceback(s), {results.log.errors} error line(s)"
        )
    last = results.idle or results.end
    if results.start and last and last.fds > results.start.fds + FD_SLACK:
        problems.append(f"open fds grew from {results.start.fds} to {last.fds}")
    if last and last.connections["clients"]:
        problems.append(f"client connections still open at the gateway: {last.connections['clients']}")


def run(args: argparse.Namespace, workdir: Path) -> Results:
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {int(LOAD_CPU)})  # the client lives with the upstreams
    results = Results(
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        machine=machine(args, pin),
    )
    procs = Processes(workdir, pin)
    try:
        rig = start_rig(args, workdir, procs)
        try:
            asyncio_run(soak(args, rig, results))
        finally:
            gateway_alive = rig.gateway.popen.poll() is None
            procs.stop_all()
            rig.refused.close()
        results.log = scan_log(rig.gateway.log_path)
        verdict(args, results)
        if not gateway_alive:
            results.problems.append("the gateway exited during the run:\n" + rig.gateway.tail())
    finally:
        procs.stop_all()
    return results


def asyncio_run(coro: Awaitable[None]) -> None:
    try:
        import uvloop  # noqa: PLC0415

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(coro)  # type: ignore[arg-type]


# ---- the report ----


def machine(args: argparse.Namespace, pin: bool) -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rev = "unknown revision"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        status = [*git, "status", "--porcelain", "--", "gateway"]
        dirty = subprocess.run(status, capture_output=True, text=True, check=False)
        rev = head.stdout.strip() + (" + uncommitted changes in gateway/" if dirty.stdout.strip() else "")
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    where = (
        (
            f"gateway on core {GATEWAY_CPU if args.workers == 1 else BOTH_CPUS}, client and upstreams on "
            f"core {LOAD_CPU}"
        )
        if pin
        else "not pinned"
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {now}; gateway at {rev}; "
        f"{args.workers} worker(s), {where}; log level {args.log_level}; "
        f"load average before the run {os.getloadavg()[0]:.2f}"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def connections_text(name: str, reading: Reading | None) -> str:
    if reading is None:
        return ""
    states = reading.connections.get(name, {})
    if not states:
        return "0"
    return ", ".join(f"{count} {state}" for state, count in sorted(states.items()))


def memory_table(results: Results, start: Reading, end: Reading) -> str:
    """Start, peak, end (and after the idle wait): memory, descriptors, connections."""
    idle = results.idle
    columns: list[tuple[str, Reading | None]] = [
        ("start (after warm-up)", start),
        ("peak", None),
        ("end", end),
    ]
    if idle is not None:
        columns.append((f"after {results.args['idle']:g} s idle", idle))

    def row(label: str, cell: Callable[[Reading | None], object]) -> str:
        return f"| {label} | " + " | ".join(str(cell(reading)) for _, reading in columns) + " |"

    lines = [
        "| gateway | " + " | ".join(name for name, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
        row("VmRSS MB", lambda r: f"{(r.rss_kb if r else results.peak_rss_kb) / 1024:.1f}"),
        row("VmHWM MB", lambda r: f"{r.hwm_kb / 1024:.1f}" if r else ""),
        row("open fds", lambda r: r.fds if r else results.peak_fds),
    ]
    for name in end.connections:
        label = "client connections" if name == "clients" else f"TCP to {name}"
        lines.append(row(label, functools.partial(connections_text, name)))
    growth = (end.rss_kb / start.rss_kb - 1) * 100
    return "\n".join(lines) + f"\n\nRSS growth from start to end: {growth:+.1f}%.\n"


def report(results: Results) -> str:
    out: list[str] = []
    w = out.append
    start, end = results.start, results.end
    w(f"\n## Soak\n\n{results.machine}.\n")
    args = results.args
    w(
        f"{results.requests:,} requests after {results.warmup:,} warm-up ones in {results.seconds:.1f} s: "
        f"{results.rate:,.0f} requests/s; concurrency {args['concurrency']}, seed {args['seed']}, "
        f"fault ratio {args['fault_ratio']:g}. In-flight back to 0 {results.settle_seconds:.1f} s after the "
        "last answer.\n"
    )
    if start and end:
        w(memory_table(results, start, end))
    w(outcome_table(results.tally))
    if results.view is not None:
        view = results.view
        statuses = ", ".join(f"{s}: {n:,}" for s, n in sorted(view.chat_statuses.items()))
        w(
            f"The gateway's count (gateway_requests_total, chat): {view.chat_total:,} for "
            f"{results.tally.chat_posts:,} sent; by status {statuses}."
        )
        errors = ", ".join(f"{k}: {v:,}" for k, v in sorted(view.upstream_errors.items()))
        w(f"gateway_upstream_errors_total: {errors or 'none'}.")
        w(f"gateway_inflight_requests at the end: {view.inflight}.")
    scan = results.log
    w(
        f"Gateway log: {scan.lines:,} lines, {scan.warnings:,} warnings, {scan.errors} errors, "
        f"{scan.tracebacks} Tracebacks.\n"
    )
    if results.tally.examples or scan.examples:
        w("First unexpected answers and log errors:\n")
        out.extend(f"- {example}" for example in results.tally.examples + scan.examples)
        w("")
    w("Verdict: " + ("PASS" if not results.problems else "FAIL\n- " + "\n- ".join(results.problems)))
    return "\n".join(out) + "\n"


def outcome_table(tally: Tally) -> str:
    lines = [
        "| requests | count | expected | seen | unexpected | p50 ms | p99 ms |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    order = [kind for kind, _ in MIX] + [f"{f} {m}" for f in FAULTS for m in ("plain", "stream")]
    for row in sorted(tally.outcomes, key=lambda r: order.index(r) if r in order else len(order)):
        seen = tally.outcomes[row]
        if row in DESCRIBED:
            expected = DESCRIBED[row]
        else:
            fault, mode = row.split()
            expected = " or ".join(e.describe() for e in FAULTS[fault][mode == "stream"])
        seconds = tally.seconds[row]
        outcomes = ", ".join(f"{name} x{count:,}" for name, count in seen.most_common())
        lines.append(
            f"| {row} | {sum(seen.values()):,} | {expected} | {outcomes} | {tally.unexpected[row]} | "
            f"{percentile(seconds, 50) * 1000:.1f} | {percentile(seconds, 99) * 1000:.1f} |"
        )
    total = sum(sum(seen.values()) for seen in tally.outcomes.values())
    lines.append(f"| all | {total:,} | | | {sum(tally.unexpected.values())} | | |")
    return "\n".join(lines) + "\n"


def as_json(results: Results) -> dict[str, Any]:
    tally = results.tally
    return {
        "args": results.args,
        "machine": results.machine,
        "requests": results.requests,
        "warmup": results.warmup,
        "seconds": results.seconds,
        "requests_per_second": results.rate,
        "rss_kb": {
            "start": results.start and results.start.rss_kb,
            "peak": results.peak_rss_kb,
            "end": results.end and results.end.rss_kb,
            "after_idle": results.idle and results.idle.rss_kb,
            "hwm_end": results.end and results.end.hwm_kb,
        },
        "fds": {
            "start": results.start and results.start.fds,
            "peak": results.peak_fds,
            "end": results.end and results.end.fds,
            "after_idle": results.idle and results.idle.fds,
        },
        "connections": {
            moment: reading and reading.connections
            for moment, reading in (
                ("start", results.start),
                ("end", results.end),
                ("after_idle", results.idle),
            )
        },
        "outcomes": {row: dict(seen) for row, seen in tally.outcomes.items()},
        "unexpected": dict(tally.unexpected),
        "unexpected_examples": tally.examples,
        "latency_ms": {
            row: {
                "p50": percentile(s, 50) * 1000,
                "p99": percentile(s, 99) * 1000,
                "mean": statistics.fmean(s) * 1000,
            }
            for row, s in tally.seconds.items()
        },
        "gateway": results.view and asdict(results.view),
        "log": asdict(results.log),
        "settle_seconds": results.settle_seconds,
        "samples": [asdict(s) for s in results.samples],
        "problems": results.problems,
        "passed": not results.problems,
    }


# ---- main ----


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--requests", type=int, default=100_000, help="requests after the warm-up (default 100000)")
    add("--warmup", type=int, default=1000, help="requests before the start measurement (default 1000)")
    add("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    add("--fault-ratio", type=float, default=0.05, help="share of fault-* requests (default 0.05)")
    add("--seed", type=int, default=1, help="seed of the request mix (default 1)")
    add("--max-seconds", type=float, default=1200, help="stop sending after this long (default 1200)")
    add(
        "--idle",
        type=float,
        default=40,
        help="seconds of quiet before the last reading (default 40; 0: none)",
    )
    add("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    add("--log-level", default="info", choices=["info", "warning"], help="the gateway's (default info)")
    add("--quick", action="store_true", help="5,000 requests after 500 warm-up: checks the script itself")
    add("--no-pin", action="store_true", help="do not pin processes to cores with taskset")
    add("--workdir", type=Path, help="keep the config and logs here (default: a temporary directory)")
    add("--json", type=Path, help="also write the figures here")
    add("--faulty-upstream", action="store_true", help="only serve the misbehaving Ollama on --port")
    add("--port", type=int, default=11600, help="with --faulty-upstream: the port (default 11600)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.warmup = min(args.requests, 5000), min(args.warmup, 500)
    if not 1 <= args.requests <= 10_000_000 or not 0 <= args.warmup <= 100_000:
        parser.error("--requests must be 1..10000000 and --warmup 0..100000")
    if not 1 <= args.concurrency <= 1024 or not 0 <= args.fault_ratio <= 1:
        parser.error("--concurrency must be 1..1024 and --fault-ratio 0..1")
    if not 1 <= args.workers <= 8 or not 0 < args.max_seconds <= 24 * 3600 or not 0 <= args.idle <= 600:
        parser.error("--workers must be 1..8, --max-seconds up to a day and --idle 0..600")
    return args


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.faulty_upstream:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_faulty(args.port))
        return 0
    signal.signal(signal.SIGTERM, on_sigterm)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="phoenix-soak-")))
        else:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        try:
            results = run(args, workdir)
        except Failure as exc:
            log(f"error: {exc}")
            return 1
        except KeyboardInterrupt:
            log("interrupted; every process this run started has been stopped")
            return 130
    print(report(results), flush=True)
    if args.json:
        args.json.write_text(json.dumps(as_json(results), indent=1))
    return 1 if results.problems else 0


if __name__ == "__main__":
    sys.exit(main())
