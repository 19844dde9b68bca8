"""Pure ASGI middleware (never BaseHTTPMiddleware: it hides client disconnects).

RequestId: honours a sane `x-request-id`, else makes one; puts it in the scope, on every
response, and in every log line of the request.
"""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

from gateway.logs import REQUEST_ID

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SANE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> str:
    return os.urandom(16).hex()


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id" and _SANE_ID.match(value):
            return value.decode("ascii")
    return new_request_id()


class RequestId:
    """`labelled`: POST paths whose answers carry `x-request-id` already (the hot routes put it
    in their own headers), so their `send` is not wrapped: a stream sends once per chunk."""

    def __init__(self, app: ASGIApp, labelled: Collection[str] = ()) -> None:
        self.app = app
        self.labelled = frozenset(labelled)
        self.running = 0  # HTTP requests whose ASGI call has not returned

    def begin(self, scope: Scope) -> tuple[str, contextvars.Token[str | None]]:
        """An HTTP request begins: its id, set for its log lines (the token goes back to `end`)."""
        request_id = request_id_from(scope["headers"])
        self.running += 1
        return request_id, REQUEST_ID.set(request_id)

    def end(self, token: contextvars.Token[str | None]) -> None:
        self.running -= 1
        REQUEST_ID.reset(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, token = self.begin(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        if scope["method"] != "POST" or scope["path"] not in self.labelled:
            header = (b"x-request-id", request_id.encode("ascii"))
            plain_send = send

            async def send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), header]
                await plain_send(message)

        try:
            await self.app(scope, receive, send)
        finally:
            self.end(token)
