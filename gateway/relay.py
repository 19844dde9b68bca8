"""The only writer to the client: turns `Completion`s and `Chunk`s into OpenAI bytes.

A stream gets one `id` and `created`; each choice gets `role` in its first delta only, tool-call
ids and names in their first fragment only, and a separate finish chunk; with
`stream_options.include_usage` a last chunk with `choices: []` carries the usage; then
`data: [DONE]`. A failure after the first byte becomes a `data: {"error": ...}` event and the
stream ends. A client that goes away cancels the stream, which closes the upstream response
(gateway/eventstream.py sends the bytes and watches for that).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from gateway.errors import GatewayError, ShuttingDown, StreamOverTime, UpstreamError, UpstreamTimeout
from gateway.exchange import CANCELLED, Exchange
from gateway.providers.base import random_id
from gateway.schemas import Chunk, Completion, ToolCallDelta, Usage
from gateway.sse import DONE


def tool_call_dict(call: ToolCallDelta) -> dict[str, Any]:
    """A whole call, or a call's first fragment, with the fields the backend added. OpenAI requires
    its id: a call from a backend that sent none gets one made here (the client sends it back with
    the call's result)."""
    if call.custom:
        out = {
            "id": call.id or random_id("call_"),
            "type": "custom",
            "custom": {"name": call.name or "", "input": call.arguments},
        }
    else:
        out = {
            "id": call.id or random_id("call_"),
            "type": "function",
            "function": {"name": call.name or "", "arguments": call.arguments},
        }
    return {**out, **call.extra} if call.extra else out


def logprobs_dict(content: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if content is None else {"content": content, "refusal": None}


def completion_body(
    completion: Completion, *, model: str, completion_id: str | None = None
) -> dict[str, Any]:
    choices = []
    for choice in completion.choices:
        message: dict[str, Any] = {"role": "assistant", "content": choice.content, "refusal": choice.refusal}
        if choice.reasoning:
            message["reasoning_content"] = choice.reasoning
        if choice.tool_calls:
            message["tool_calls"] = [tool_call_dict(call) for call in choice.tool_calls]
        if choice.annotations is not None:
            message["annotations"] = choice.annotations
        choices.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": None if choice.logprobs is None else logprobs_dict(choice.logprobs),
                "finish_reason": choice.finish_reason,
            }
        )
    return {
        "id": completion_id or random_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": completion.usage.as_dict(),
        **completion.extra,
    }


UNREPORTED = "unreported"  # the `usage` notice when a backend sent no token counts


# What a notice's value may show as it is: printable ASCII, but for `%`, which marks the escapes.
_SHOWN = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def _shown(value: str) -> str:
    """A notice's value as header and SSE comment text. Some name what the client wrote (the
    schema keywords Gemini lacks): a line break there ended the header or the comment, the rest
    then a header or an event of its own (or a dropped connection), and a character past latin-1
    made the answer a 500. Those characters are percent-encoded (UTF-8)."""
    return (
        value if value.isascii() and value.isprintable() and "%" not in value else quote(value, safe=_SHOWN)
    )


def notice_headers(notices: dict[str, str]) -> dict[str, str]:
    """`prompt_truncated` -> `x-phoenix-prompt-truncated`."""
    return {"x-phoenix-" + key.replace("_", "-"): _shown(value) for key, value in notices.items()}


def notice_comments(notices: dict[str, str]) -> bytes:
    """Streams learn such facts only at the end, after the headers: SSE comments, which clients skip."""
    return b"".join(f": {key}={_shown(value)}\n\n".encode() for key, value in notices.items())


def error_event(error: GatewayError) -> bytes:
    return b"data: " + orjson.dumps(error.body()) + b"\n\n"


@dataclass(slots=True)
class StreamSource:
    """An opened upstream stream: the chunks that proved it alive (one read's), the rest (a list
    per read), and its deadlines."""

    first: list[Chunk]
    rest: AsyncIterator[list[Chunk]]
    idle_timeout: float
    deadline: float  # perf_counter() value after which the stream is cut
    # Releases the backend lease and reports how the stream ended: the upstream failure that cut
    # it, or None (it ended, the client left, or the gateway failed).
    on_close: Callable[[UpstreamError | None], None]


IDLE = "the backend sent nothing within its idle deadline (timeouts.idle)"
OVER_TIME = "the stream was still going at its total deadline (timeouts.total)"
# A write to the client may wait this long, or to the total deadline. A write waits only once the
# client has left unread all that the socket buffers hold (hundreds of KB, for chat a whole answer
# many times over): a slow reader is served; one that stopped reading does not hold the backend.
CLIENT_STALL_SECONDS = 60.0


class _Watchdog:
    """The idle and total deadlines of one stream, on one timer for the whole stream. A read from
    the backend only notes when it began; the timer, when it fires, cancels a read that has waited
    past its deadline, or sets itself for the one under way. A write to the client only counts
    itself: one the timer finds under way for CLIENT_STALL_SECONDS, or at the total deadline, is a
    client that stopped reading (`stalled`). (An `asyncio.timeout` around each read
    made and cancelled a timer per chunk: a sixth of a stream's CPU on the benchmark.)"""

    __slots__ = (
        "_cancelling", "_handle", "_loop", "_task", "_write_seen_at", "_writes_seen", "deadline", "expired",
        "idle", "over_time", "since", "stalled", "waiting", "writes", "writing",
    )  # fmt: skip

    def __init__(self, idle: float, deadline: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._cancelling = self._task.cancelling() if self._task is not None else 0
        self.idle = idle
        self.deadline = deadline  # loop time
        self.since = 0.0
        self.waiting = False
        self.writing = False
        self.writes = self._writes_seen = 0
        self._write_seen_at = 0.0  # when the timer first found the write under way
        self.expired = False
        self.over_time = False  # it was the total deadline that expired, not the idle one
        self.stalled = False
        self._handle: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        """A read begins now (raises TimeoutError when the total deadline has passed)."""
        now = self._loop.time()
        if now >= self.deadline:
            raise TimeoutError
        self.since, self.waiting = now, True
        if self._handle is None:
            self._arm(now)

    def begin_write(self) -> None:
        """A write to the client begins; `end_write` once the client has taken it."""
        self.writing = True
        self.writes += 1
        if self._handle is None:
            self._arm(self._loop.time())

    def end_write(self) -> None:
        self.writing = False

    def _arm(self, now: float) -> None:
        # The shorter of the two limits: a read's idle deadline, a write's stall.
        self._handle = self._loop.call_at(
            min(now + min(self.idle, CLIENT_STALL_SECONDS), self.deadline), self._fire
        )

    def _fire(self) -> None:
        now = self._loop.time()
        task = self._task
        if self.writing and task is not None:
            if self.writes != self._writes_seen:
                self._writes_seen, self._write_seen_at = self.writes, now
            elif now - self._write_seen_at >= CLIENT_STALL_SECONDS or now >= self.deadline:
                self.stalled = True
                self._handle = None
                task.cancel()
                return
        if self.waiting:
            due = min(self.since + self.idle, self.deadline)
            if now >= due and task is not None:
                self.expired = True
                self.over_time = due >= self.deadline
                self._handle = None
                task.cancel()
                return
            self._handle = self._loop.call_at(max(due, now + 0.001), self._fire)
        else:
            self._arm(now)

    def timed_out(self) -> bool:
        """Whether the cancellation that ended a read was this watchdog's alone (it is taken back).
        When another came in the same turn (the client left, the server's shutdown deadline), that
        one is what ended the stream."""
        if not self.expired:
            return False
        self.expired = False
        return self._task is None or self._task.uncancel() <= self._cancelling

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Encoder(Protocol):
    """What makes a stream's events: chat's `ChunkEncoder`, or another API's (gateway/legacy.py)."""

    def extend(self, fields: dict[str, str]) -> None: ...

    def encode(self, chunk: Chunk) -> bytes: ...

    def usage(self, usage: Usage) -> bytes: ...


class ChunkEncoder:
    """Encodes chunks of one stream; the fixed envelope is serialised once per stream."""

    __slots__ = (
        "_calls", "_content_prefix", "_content_suffix", "_head", "_prefix", "_roles", "_suffix", "finished"
    )  # fmt: skip

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        self._content_suffix = b'},"logprobs":null,"finish_reason":null}' + self._suffix
        self._head: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model
        }  # fmt: skip
        self.extend({})
        self._roles: set[int] = set()
        self._calls: set[tuple[int, int]] = set()  # (choice, call) whose id and name went out
        self.finished: set[int] = set()

    def extend(self, fields: dict[str, str]) -> None:
        """Every event from now on carries `fields` in its envelope too."""
        self._head.update(fields)
        self._prefix = b"data: " + orjson.dumps(self._head)[:-1] + b',"choices":['
        # Most events are a piece of text for choice 0: all but the text is fixed
        self._content_prefix = self._prefix + b'{"index":0,"delta":{"content":'

    def _event(self, choice: dict[str, Any]) -> bytes:
        return self._prefix + orjson.dumps(choice) + self._suffix

    def encode(self, chunk: Chunk) -> bytes:
        index = chunk.index
        if (
            not index
            and chunk.content
            and chunk.finish_reason is None
            and not chunk.reasoning
            and not chunk.tool_calls
            and chunk.logprobs is None
            and not chunk.refusal
            and 0 in self._roles
        ):  # the same bytes as below, without building and serialising the envelope
            return self._content_prefix + orjson.dumps(chunk.content) + self._content_suffix
        out = b""
        if index not in self._roles:
            self._roles.add(index)
            first = {"role": "assistant", "content": "" if not chunk.tool_calls else None}
            out += self._event({"index": index, "delta": first, "logprobs": None, "finish_reason": None})
        delta: dict[str, Any] = {}
        if chunk.reasoning:
            delta["reasoning_content"] = chunk.reasoning
        if chunk.content:
            delta["content"] = chunk.content
        if chunk.refusal:
            delta["refusal"] = chunk.refusal
        if chunk.tool_calls:
            delta["tool_calls"] = [self._tool_call(index, call) for call in chunk.tool_calls]
        if delta:
            logprobs = logprobs_dict(chunk.logprobs)
            out += self._event({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None})
        if chunk.finish_reason is not None and index not in self.finished:
            self.finished.add(index)
            out += self._event(
                {"index": index, "delta": {}, "logprobs": None, "finish_reason": chunk.finish_reason}
            )
        return out

    def _tool_call(self, index: int, call: ToolCallDelta) -> dict[str, Any]:
        """A call's id and name go out with its first fragment only, as OpenAI sends them (clients
        join fragments by concatenation), even from a backend that repeats them in every one; a
        call's first fragment is the first with its index, with an id or not."""
        if (index, call.index) in self._calls:
            key, field = ("custom", "input") if call.custom else ("function", "arguments")
            return {"index": call.index, key: {field: call.arguments}, **(call.extra or {})}
        self._calls.add((index, call.index))
        return {"index": call.index, **tool_call_dict(call)}

    def usage(self, usage: Usage) -> bytes:
        return self._prefix + b'],"usage":' + orjson.dumps(usage.as_dict()) + b"}\n\n"


class StreamRelay:
    """Relays one opened stream to the client; `finish(status)` is called exactly once, at the end."""

    def __init__(
        self,
        source: StreamSource,
        exchange: Exchange,
        *,
        model: str,
        include_usage: bool,
        finish: Callable[[int], None],
        on_unexpected: Callable[[BaseException], None],
        choices: int = 1,
        encoder: Encoder | None = None,
    ) -> None:
        self._source = source
        self._choices = choices  # `n`: the answers are written side by side, their tokens counted together
        self._exchange = exchange
        self._encoder: Encoder = encoder or ChunkEncoder(
            random_id("chatcmpl-"), int(time.time()), model, include_usage
        )
        self._include_usage = include_usage
        self._finish = finish
        self._on_unexpected = on_unexpected
        self._usage: Usage | None = None
        self._last_output = 0.0
        self._reasoned = False  # reasoning was relayed (not only counted, as Gemini's unshown thoughts)
        self._gone = False  # the client left: the stream was cancelled for that
        self._watchdog: _Watchdog | None = None

    def client_gone(self) -> None:
        """Called before the stream is cancelled because the client left."""
        self._gone = True

    def client_stalled(self) -> bool:
        """Whether the stream was cancelled because the client stopped taking what was written."""
        return self._watchdog is not None and self._watchdog.stalled

    def _stopped(self) -> int:
        """The status of a stream stopped early: 499 when the client left, stopped reading, or
        when the writer failed; a cancellation that was not the client's is the server's at its
        shutdown deadline (the only time it cancels a request), which is recorded as such."""
        task = asyncio.current_task()
        stalled = self.client_stalled()
        if stalled:
            self._exchange.notes["cut"] = "client stopped reading"
        if self._gone or stalled or task is None or not task.cancelling():
            return CANCELLED
        cut = ShuttingDown()
        self._exchange.error_type = cut.type
        return cut.http_status

    def _watch(self) -> _Watchdog:
        source = self._source
        # the deadline is a perf_counter() value; the timer runs on loop time
        loop_deadline = asyncio.get_running_loop().time() + (source.deadline - time.perf_counter())
        watchdog = self._watchdog = _Watchdog(source.idle_timeout, loop_deadline)
        return watchdog

    async def _next(self, watchdog: _Watchdog) -> list[Chunk] | None:
        source = self._source
        waited = time.perf_counter()
        try:
            watchdog.begin()
            return await anext(source.rest)
        except StopAsyncIteration:
            return None
        except TimeoutError:  # the total deadline had passed before this read
            raise StreamOverTime(OVER_TIME) from None
        except asyncio.CancelledError:
            if watchdog.timed_out():
                raise StreamOverTime(OVER_TIME) if watchdog.over_time else UpstreamTimeout(IDLE) from None
            raise
        finally:
            watchdog.waiting = False
            self._exchange.upstream_seconds += time.perf_counter() - waited

    def _encode(self, chunks: list[Chunk]) -> bytes:
        """One read's chunks as one write (they arrived together: one time for all of them)."""
        encode = self._encoder.encode
        out = []
        output = False
        for chunk in chunks:
            if chunk.notices:
                self._exchange.notes.update(chunk.notices)
                out.append(notice_comments(chunk.notices))
            if chunk.envelope:
                self._encoder.extend(chunk.envelope)
            if chunk.usage is not None:
                self._usage = chunk.usage
            if chunk.reasoning:
                self._reasoned = True
            output = output or chunk.has_output
            out.append(encode(chunk))
        if output:
            exchange = self._exchange
            exchange.relayed += len(chunks)  # about a token each (a read's finish or usage chunk too)
            self._last_output = time.perf_counter()
            if exchange.first_token_at is None:
                exchange.first_token_at = self._last_output
        return b"".join(out)

    async def body(self) -> AsyncIterator[bytes]:
        exchange = self._exchange
        status = 200
        failure: UpstreamError | None = None
        try:
            watchdog = self._watch()
            chunks: list[Chunk] | None = self._source.first
            while chunks is not None:
                data = self._encode(chunks)
                if data:
                    watchdog.begin_write()
                    yield data
                    watchdog.end_write()
                chunks = await self._next(watchdog)
            if self._usage is None:  # the backend counted nothing: zeros for the client, no count here
                exchange.notes["usage"] = UNREPORTED
                if self._include_usage:
                    yield notice_comments({"usage": UNREPORTED}) + self._encoder.usage(Usage())
            elif self._include_usage:
                yield self._encoder.usage(self._usage)
            yield DONE
        except GatewayError as error:
            status = error.http_status
            exchange.error_type = error.type
            if isinstance(error, UpstreamError):
                exchange.notes["upstream_error"] = error.reason
                failure = error
            yield error_event(error)
        except (asyncio.CancelledError, GeneratorExit):
            status = self._stopped()
            raise
        except Exception as error:  # our own bug: tell the client plainly, log the type
            status = 500
            self._on_unexpected(error)
            yield error_event(GatewayError(f"internal error in the gateway (request {exchange.request_id})"))
        finally:
            if self._watchdog is not None:
                self._watchdog.stop()
            try:
                await _close(self._source.rest)
            finally:
                self._source.on_close(failure)
                # The failure's traceback holds this frame: a reference cycle, holding the request
                # until a full collection, unless the frame lets go of it.
                failure = None
                self._close_books(status)

    def _close_books(self, status: int) -> None:
        exchange, usage = self._exchange, self._usage
        exchange.usage = usage
        first = exchange.first_token_at
        if usage is not None and first is not None:
            # The tokens of one answer written after its first: reasoning that was counted but not
            # relayed came before the first token, and `n` answers were written side by side.
            shown = usage.completion_tokens
            if usage.reasoning_tokens and not self._reasoned:
                shown -= usage.reasoning_tokens
            tokens = shown / self._choices
            if tokens > 1:
                exchange.time_per_token = (self._last_output - first) / (tokens - 1)
        self._finish(status)


async def _close(stream: AsyncIterator[object]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
