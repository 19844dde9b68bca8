"""Incremental NDJSON decoding: bytes as they arrive from the socket -> one JSON value per line.

A JSON object may span several reads, so a partial line is kept until its newline arrives;
`flush` returns what is left when the stream ends. Blank lines are skipped. Values are parsed as
the caller iterates, so every line before a malformed one reaches the caller before the error
does, however the bytes were split into reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

MAX_LINE_BYTES = 16 * 1024 * 1024


class LineTooLong(ValueError):
    """A line grew past the limit without a newline: the peer is not speaking NDJSON."""


class NDJSONDecoder:
    __slots__ = ("_buffer", "_max_line")

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buffer = bytearray()  # the partial line: appended to in place, so a long one costs linear time
        self._max_line = max_line

    def feed(self, data: bytes) -> Iterator[Any]:
        """The values of every line completed by `data`, in order. Iterating raises
        orjson.JSONDecodeError at a malformed line, or LineTooLong after the complete lines."""
        if b"\n" not in data:
            self._buffer += data
            self._check(self._buffer)
            return iter(())
        buffer = bytes(self._buffer) + data if self._buffer else data
        *lines, rest = buffer.split(b"\n")
        self._buffer = bytearray(rest)
        return self._values(lines, rest)

    def _values(self, lines: list[bytes], rest: bytes) -> Iterator[Any]:
        for line in lines:
            if line.strip():
                yield orjson.loads(line)
        self._check(rest)

    def flush(self) -> list[Any]:
        """The value of a last line that had no newline, if any."""
        rest, self._buffer = self._buffer, bytearray()
        return [orjson.loads(rest)] if rest.strip() else []

    def _check(self, partial: bytes | bytearray) -> None:
        if len(partial) > self._max_line:
            raise LineTooLong(f"line longer than {self._max_line} bytes")
