"""uvicorn's httptools protocol with a limit on the request head.

httptools takes a request line and headers of any size, and uvicorn keeps them all: one request
with 40 MB of headers grew the worker by 180 MB and held its loop for most of a second, past
`server.max_body_bytes`, which only bounds the body. Here the request line and header fields of
one request may take HEAD_LIMIT bytes; past that the request gets the answer to a malformed
request (400, and the connection closed), as it would behind nginx (8 KiB a line) or Node (16 KiB).
That 400 is in OpenAI's error shape, as every other error is (uvicorn's own is the text/plain
"Invalid HTTP request received."), and says whether the head was too large or not HTTP at all.
A header line that does not end is counted as it arrives: httptools hands a header over only at its
end, and keeps (copying at every read) all that came before; a head still unfinished after
2 * HEAD_LIMIT bytes is refused the same way.

Two waits have a limit too, where uvicorn (0.54) sets none:
- a new connection that sends nothing is closed after uvicorn's keep-alive timeout (5 s), as an
  idle one is between requests; uvicorn arms that timer only once a response is done, so a client
  that connected and never wrote held its socket for good;
- a request head must arrive whole within HEAD_SECONDS of its first bytes (as nginx's
  `client_header_timeout`): one sent a byte at a time held its connection, and its buffer, for
  as long as the client liked. It is answered 408 and the connection closed. The timer is armed
  only when a read leaves a head unfinished, which a request that arrives whole never does.

It also offers the app a way to drop a connection (the scope extension ABORT): a stream whose
client has stopped reading cannot be finished, and closing its transport would wait forever to
send what nobody takes. Aborted, the connection is lost at once and uvicorn knows the response
will not be completed, so it does not log an error for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_LIMIT = 64 * 1024  # bytes of request line and header names and values
HEAD_SECONDS = 30.0  # a request head's bytes must all arrive within this, from its first
ABORT = "phoenix.abort"  # scope["extensions"][ABORT](): drop the connection, unsent bytes and all


def _error_answer(status: bytes, message: str, code: str | None, headers: Any) -> bytes:
    """A whole answer, its connection closed after it, to a request that never reached the app: an
    OpenAI error as every other error is (uvicorn's own is text/plain)."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    body = orjson.dumps({"error": error})
    lines = [b"HTTP/1.1 %s\r\n" % status, *(b"%s: %s\r\n" % (name, value) for name, value in headers)]
    lines.append(
        b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    return b"".join(lines) + body


class HeadTooLarge(Exception):
    pass


class GatewayHttpProtocol(HttpToolsProtocol):
    _head_bytes = 0
    _head_read = 0  # bytes received while a request head was unfinished
    _in_head = True  # from the connection's start, and from the end of each request, to a whole head
    _head_timer: asyncio.TimerHandle | None = None  # armed while a head is unfinished after a read
    _head_begun = False  # the parser has seen a request's first byte, and not yet its whole head
    _head_too_large = False  # what a 400 for a request the parser refused says
    _extensions: dict[str, Any]

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_read += len(data)
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_read > 2 * HEAD_LIMIT:
            self._head_too_large = True
            message = "Invalid HTTP request received."  # as uvicorn logs one httptools refuses
            self.logger.warning(message)
            self.send_400_response(message)
        elif self._head_begun and self._head_timer is None:
            self._head_timer = self.loop.call_later(HEAD_SECONDS, self._head_too_slow)

    def send_400_response(self, msg: str) -> None:
        """The answer to a request the parser refused (`msg` is uvicorn's, for its log): uvicorn's
        400 and connection close, with an OpenAI error as its body."""
        message = (
            f"The request head (request line and headers) is larger than {HEAD_LIMIT // 1024} KiB."
            if self._head_too_large
            else "The request is not valid HTTP/1.1."
        )
        headers = self.server_state.default_headers
        self.transport.write(_error_answer(b"400 Bad Request", message, None, headers))
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = self._head_begun = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._in_head and not answering and not self.transport.is_closing():
            # (a head sent while an answer is still going out waits for the keep-alive timer
            # that follows it: a 408 now would land in the middle of that answer)
            message = f"The request head did not arrive whole within {HEAD_SECONDS:g} s."
            headers = self.server_state.default_headers
            self.transport.write(_error_answer(b"408 Request Timeout", message, "request_timeout", headers))
            self.transport.close()

    def on_message_complete(self) -> None:
        self._in_head, self._head_read = True, 0
        super().on_message_complete()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._extensions = {ABORT: transport.abort}
        # the wait for the first request is an idle wait like those between requests
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._head_begun = True
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
            self._head_too_large = True
            raise HeadTooLarge  # the parser reports it as a malformed request
