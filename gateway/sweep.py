"""Requests that take long are looked after by one timer, not by a task each.

Almost every request is over well within a second, and a watch task per request would cost a few
percent of its CPU. So a request only joins the sweeper's table when it begins and leaves it when
its answer is ready. Once a second one timer walks the table:

- a request whose body has not grown for `server.body_timeout` seconds is cancelled and answered
  408 (the connection is closed, since the rest of the body never came);
- a request whose body is in and that was already there at the sweep before (so at least a second
  old) gets a `Departure`: if its client leaves, the request's task is cancelled, which closes the
  upstream and so frees the backend, and the request is recorded as 499. A stream's route starts
  its own watch before the answer begins (`Incoming.watch`), so this is for the non-streaming
  requests and for a stream's slow start (fetching images, a rate-limit store).

The route's `except CancelledError` asks `Incoming.why_cancelled` which of the two it was, if
either; otherwise it was the server's shutdown deadline.
"""

from __future__ import annotations

import asyncio
import time

from gateway.eventstream import Departure
from gateway.incoming import Incoming

SWEEP_SECONDS = 1.0


class Sweeper:
    __slots__ = ("_handle", "_loop", "entries")

    def __init__(self) -> None:
        self.entries: dict[Incoming, None] = {}  # requests under way, oldest first
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def join(self, request: Incoming) -> None:
        """From the request's own task, as it begins."""
        loop = self._loop
        if self._handle is None or loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
            self._handle = loop.call_later(SWEEP_SECONDS, self._sweep)
        request.task = asyncio.current_task(loop)  # with its loop given, it makes no system call
        self.entries[request] = None

    def leave(self, request: Incoming) -> None:
        """When the request's answer is ready: a watch the route did not take over ends here."""
        self.entries.pop(request, None)
        departure = request.departure
        if departure is not None and not request.watch_kept:
            departure.stop()

    def _sweep(self) -> None:
        self._handle = None
        now = time.monotonic()
        for request in list(self.entries):
            if request.body_read:
                if request.swept_at and request.departure is None and request.task is not None:
                    request.departure = Departure(request.receive, request.task)
                    del self.entries[request]  # nothing left to look at; `leave` still stops the watch
            elif request.received != request.seen or not request.swept_at:
                request.seen = request.received
                request.seen_at = now
            elif now - request.seen_at >= request.state.config.server.body_timeout:
                del self.entries[request]
                request.overdue = True
                if request.task is not None:
                    request.task.cancel()
            request.swept_at = now
        if self.entries and self._loop is not None and not self._loop.is_closed():
            self._handle = self._loop.call_later(SWEEP_SECONDS, self._sweep)
