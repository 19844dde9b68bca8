"""The ASGI side of a streamed answer: the SSE response, and the watch for a client that leaves.

The relay (gateway/relay.py) makes the bytes; this sends them, ends the response with the
`data: [DONE]` it was given, and cancels the request's task when the client goes, which stops
the relay and so the upstream. A watch can begin before the answer does (`Departure`), so a
client that gives up during a cold model load frees the backend then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, suppress
from typing import Any

from gateway.errors import ShuttingDown
from gateway.protocol import ABORT
from gateway.relay import error_event
from gateway.sse import DONE

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


class Departure:
    """Watches for the client leaving: then `gone` is set, `on_gone` called and the request's task
    cancelled, which closes the upstream and stops the generation. A stream's route starts it
    before the answer has begun (a cold model load can take minutes), and its EventStream goes on
    with it; `stop` ends the watch once nothing is left to cancel."""

    __slots__ = ("_task", "_watch", "gone", "on_gone", "stopped")

    def __init__(self, receive: Receive, task: asyncio.Task[Any] | None = None) -> None:
        task = task or asyncio.current_task()
        assert task is not None
        self._task = task
        self.gone = False
        self.stopped = False
        self.on_gone: Callable[[], None] | None = None
        self._watch = asyncio.ensure_future(_disconnected(receive))
        self._watch.add_done_callback(self._left)

    def _left(self, watch: asyncio.Future[None]) -> None:
        if watch.cancelled() or self.stopped:
            return
        watch.exception()  # whatever ended the wait, the client cannot be written to any more
        self.gone = True
        if self.on_gone is not None:
            self.on_gone()
        self._task.cancel()

    def stop(self) -> None:
        self.stopped = True
        self._watch.cancel()


class EventStream:
    """ASGI response for SSE. The body runs in the request's own task; a Departure (the route's,
    or one of its own) waits for the client to leave and then cancels it, which stops the body and
    so the upstream. The response ends with `data: [DONE]` when the body yields it, or after the
    body. When the server cancels it (its shutdown deadline has passed) before that, the client
    gets an error event saying so, then the end of the stream."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        headers: dict[str, str],
        on_client_gone: Callable[[], None] | None = None,
        departure: Departure | None = None,
        stalled: Callable[[], bool] | None = None,
    ) -> None:
        self._body = body
        self._on_client_gone = on_client_gone
        self._stalled = stalled  # whether a cancellation was for a client that stopped reading
        self._departure = departure  # the route's, already watching since before the answer began
        if departure is not None:
            departure.on_gone = on_client_gone
        self._headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        self._headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        departure = self._departure
        if departure is None:
            departure = Departure(receive)
            departure.on_gone = self._on_client_gone
        over = False
        try:
            async with aclosing(self._body) as body:  # type: ignore[type-var]
                async for data in body:
                    # Nothing follows `data: [DONE]`: the response ends with it, in the same write,
                    # and the body's own ending (closing the upstream, the bookkeeping) comes after.
                    over = departure.stopped = data is DONE
                    await send({"type": "http.response.body", "body": data, "more_body": not over})
            if not over:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            task.uncancel()
            if departure.gone or over:
                return  # nothing more can be written to this client
            if self._stalled is not None and self._stalled():
                await _drop(scope)
                return
            with suppress(OSError, RuntimeError):  # the client may be gone too
                await send(
                    {"type": "http.response.body", "body": error_event(ShuttingDown()), "more_body": True}
                )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            departure.stop()


async def _drop(scope: Scope) -> None:
    """Ends the connection of a client that reads nothing: its response cannot be finished. Under
    `gateway serve` the protocol offers the abort (gateway/protocol.py); once the loss has run,
    uvicorn knows the response is not coming."""
    abort = scope.get("extensions", {}).get(ABORT)
    if abort is not None:
        abort()
        await asyncio.sleep(0)  # the transport calls connection_lost soon, before this resumes


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
