"""Server-sent events: an incremental decoder that follows the HTML spec's line rules, and the encoder.

Lines end in `\\n`, `\\r\\n` or `\\r` (a `\\r` at the end of one read may be the first half of a
`\\r\\n`, so it is held back); a blank line dispatches the event; `:` starts a comment; several
`data:` lines join with `\\n`. Only the fields a gateway needs are kept: event, data, id, retry.
One line, and one event's data lines together, may hold `max_line` characters (a stream of short
`data:` lines with no blank line between them would otherwise grow one event without end).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.ndjson import MAX_LINE_BYTES, LineTooLong

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    __slots__ = (
        "_data",
        "_data_size",
        "_event",
        "_id",
        "_max_line",
        "_pending",
        "_retry",
        "_size",
        "_utf8",
        "cut",
    )

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        # The partial line, in pieces joined only once a line ends (a long line costs linear time).
        self._pending: list[str] = []
        self._size = 0
        # A character split between two reads is decoded whole when its second half arrives.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._data: list[str] = []
        self._data_size = 0  # characters in `_data`
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._max_line = max_line
        self.cut = False  # set by `flush`: the stream ended in the middle of an event

    def feed(self, chunk: bytes | str) -> list[Event]:
        text = self._utf8.decode(chunk) if isinstance(chunk, bytes) else chunk
        if (
            text.endswith("\n\n")
            and not self._pending
            and not self._data
            and not self._event
            and "\r" not in text
        ):  # whole events, as servers write them: no line to hold back, nothing left from before
            return self._whole(text)
        waiting_for_lf = bool(self._pending) and self._pending[-1].endswith("\r")
        if "\n" not in text and "\r" not in text and not waiting_for_lf:
            self._pending.append(text)
            self._size += len(text)
            self._check()
            return []
        text = "".join(self._pending) + text
        events: list[Event] = []
        start = 0
        length = len(text)
        while True:
            cr = text.find("\r", start)
            lf = text.find("\n", start)
            if cr == -1 and lf == -1:
                break
            end = lf if cr == -1 else cr if lf == -1 else min(cr, lf)
            if text[end] == "\r":
                if end + 1 == length:
                    break  # maybe half of a CRLF: wait for the next read
                step = 2 if text[end + 1] == "\n" else 1
            else:
                step = 1
            event = self._line(text[start:end])
            if event is not None:
                events.append(event)
            start = end + step
        rest = text[start:]
        self._pending = [rest] if rest else []
        self._size = len(rest)
        self._check()
        return events

    def _whole(self, text: str) -> list[Event]:
        """Events ending with this read: the most common, one `data:` line each, taken whole; any
        other goes through the line rules (`_line`), with the same result."""
        events: list[Event] = []
        for block in text[:-2].split("\n\n"):
            if block.startswith("data:") and "\n" not in block:
                value = block[6:] if block.startswith("data: ") else block[5:]
                if len(value) + 1 > self._max_line:
                    raise LineTooLong(f"event longer than {self._max_line} characters")
                events.append(Event(value, "message", self._id, self._retry))
                continue
            for line in [*block.split("\n"), ""]:  # the blank line that ended the block dispatches it
                if (event := self._line(line)) is not None:
                    events.append(event)
        return events

    def _check(self) -> None:
        if self._size > self._max_line:
            raise LineTooLong(f"line longer than {self._max_line} characters")

    def flush(self) -> list[Event]:
        """End of stream: a trailing line without terminator counts; an event no blank line
        dispatched is dropped, as the spec says, and `cut` is set: the stream ended inside it."""
        events: list[Event] = []
        pending = "".join(self._pending) + self._utf8.decode(b"", final=True)
        self._pending, self._size = [], 0
        if pending:
            event = self._line(pending.rstrip("\r"))
            if event is not None:
                events.append(event)
        self.cut = bool(self._data)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data_size += len(value) + 1
            if self._data_size > self._max_line:
                raise LineTooLong(f"event longer than {self._max_line} characters")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._event = ""
            return None
        event = Event("\n".join(self._data), self._event or "message", self._id, self._retry)
        self._data = []
        self._data_size = 0
        self._event = ""
        return event


def encode(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"
