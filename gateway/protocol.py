"""uvicorn's httptools protocol with a limit on the request head.

httptools takes a request line and headers of any size, and uvicorn keeps them all: one request
with 40 MB of headers grew the worker by 180 MB and held its loop for most of a second, past
`server.max_body_bytes`, which only bounds the body. Here the request line and header fields of
one request may take HEAD_LIMIT bytes; past that the request gets uvicorn's answer to a malformed
request (400, and the connection closed), as it would behind nginx (8 KiB a line) or Node (16 KiB).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_LIMIT = 64 * 1024  # bytes of request line and header names and values


class HeadTooLarge(Exception):
    pass


class GatewayHttpProtocol(HttpToolsProtocol):
    _head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > HEAD_LIMIT:
            raise HeadTooLarge  # the parser reports it as a malformed request
