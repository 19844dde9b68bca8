"""Incremental NDJSON decoding: bytes as they arrive from the socket -> one JSON value per line.

A JSON object may span several reads, so a partial line is kept until its newline arrives;
`flush` returns what is left when the stream ends. Blank lines are skipped.
"""

from __future__ import annotations

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

    def feed(self, data: bytes) -> list[Any]:
        """The values of every line completed by `data`. Raises orjson.JSONDecodeError or LineTooLong."""
        if b"\n" not in data:
            self._buffer += data
            self._check(self._buffer)
            return []
        buffer = bytes(self._buffer) + data if self._buffer else data
        *lines, rest = buffer.split(b"\n")
        self._check(rest)
        self._buffer = bytearray(rest)
        return [orjson.loads(line) for line in lines if line.strip()]

    def flush(self) -> list[Any]:
        """The value of a last line that had no newline, if any."""
        rest, self._buffer = self._buffer, bytearray()
        return [orjson.loads(rest)] if rest.strip() else []

    def _check(self, partial: bytes | bytearray) -> None:
        if len(partial) > self._max_line:
            raise LineTooLong(f"line longer than {self._max_line} bytes")
