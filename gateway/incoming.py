"""A request as the two traffic routes read it, taken from the ASGI scope once.

Starlette's Request looks a header up by scanning the raw list and decoding on every call, makes
its `state` object on first use, and streams the body through an async generator: together 5% of
a request's CPU on the benchmark, for the three headers and one body message a route reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.errors import BodyTimeout, ClientGone, GatewayError
from gateway.eventstream import Departure
from gateway.middleware import Receive, Scope, new_request_id

if TYPE_CHECKING:
    import asyncio

    from gateway.state import State


@dataclass(slots=True, eq=False)  # hashed by identity: the sweeper's table holds them
class Incoming:
    app: Any  # the Starlette app: its `gateway_state` is the State in force (a reload swaps it)
    request_id: str
    headers: dict[str, str]  # lower-case names; a repeated header's lines joined by ", " (RFC 9110 5.3)
    receive: Receive
    body_read: bool = False  # the whole body has come in (else an error answer closes the connection)
    received: int = 0  # bytes of the body so far
    # what the sweeper (gateway/sweep.py) keeps of the request
    task: asyncio.Task[object] | None = None
    departure: Departure | None = None  # the watch for the client leaving, once there is one
    watch_kept: bool = False  # the route took the watch over (a stream's response goes on with it)
    swept_at: float = 0.0
    seen: int = 0  # `received` at the sweep that last saw it grow
    seen_at: float = 0.0
    overdue: bool = False  # cancelled because the body stopped coming

    @classmethod
    def from_scope(cls, scope: Scope, receive: Receive, request_id: str | None = None) -> Incoming:
        """`request_id`: the front's (gateway/app.py); else the one RequestId put in the scope."""
        raw = scope["headers"]
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}
        if len(headers) != len(raw):  # a header came more than once: every line counts, not the last
            headers = {}
            for name, value in raw:
                key, text = name.decode("latin-1"), value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
        request_id = request_id or scope.get("state", {}).get("request_id") or new_request_id()
        return cls(scope["app"], request_id, headers, receive)

    def watch(self) -> Departure:
        """The watch for the client leaving, started now unless the sweeper has; the caller owns it."""
        if self.departure is None:
            self.departure = Departure(self.receive)
        self.watch_kept = True
        return self.departure

    def why_cancelled(self) -> GatewayError | None:
        """After the request's task was cancelled: the error to answer with when the cancellation
        was the body's timeout or the client leaving; None when it was the server's."""
        if self.overdue:
            timeout = self.state.config.server.body_timeout
            return BodyTimeout(f"The request body stopped arriving: nothing for {timeout:g} seconds.")
        if self.departure is not None and self.departure.gone:
            return ClientGone("The client closed the connection before the answer began.")
        return None

    @property
    def state(self) -> State:
        state: State = (
            self.app.gateway_state
        )  # as gateway.state.state_of reads it (which imports this module)
        return state
