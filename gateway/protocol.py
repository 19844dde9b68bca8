"""uvicorn's httptools protocol with a limit on the request head.

httptools takes a request line and headers of any size, and uvicorn keeps them all: one request
with 40 MB of headers grew the worker by 180 MB and held its loop for most of a second, past
`server.max_body_bytes`, which only bounds the body. Here the request line and header fields of
one request may take HEAD_LIMIT bytes; past that the request gets uvicorn's answer to a malformed
request (400, and the connection closed), as it would behind nginx (8 KiB a line) or Node (16 KiB).

It also offers the app a way to drop a connection (the scope extension ABORT): a stream whose
client has stopped reading cannot be finished, and closing its transport would wait forever to
send what nobody takes. Aborted, the connection is lost at once and uvicorn knows the response
will not be completed, so it does not log an error for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_LIMIT = 64 * 1024  # bytes of request line and header names and values
ABORT = "phoenix.abort"  # scope["extensions"][ABORT](): drop the connection, unsent bytes and all


class HeadTooLarge(Exception):
    pass


class GatewayHttpProtocol(HttpToolsProtocol):
    _head_bytes = 0
    _extensions: dict[str, Any]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._extensions = {ABORT: transport.abort}

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self.scope["extensions"] = self._extensions

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
