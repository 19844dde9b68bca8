"""Deadlines for many concurrent waits, on one timer per length of deadline.

`asyncio.timeout` makes a timer for each wait and cancels it when the wait ends: on the benchmark,
4% of a request's CPU for a deadline that almost never fires. Here a wait only joins a queue of
the waits that have the same length of deadline (a backend's first-token deadline), so the queue
is in the order they fall due, and leaves it when it ends. One timer per queue, set for its oldest
wait, cancels that wait's task if it is still there, then sets itself for the next.

A wait that ends in a `CancelledError` asks `timed_out()` whether the cancellation was its
deadline's (and then takes it back, as `asyncio.timeout` does) or somebody else's.
"""

from __future__ import annotations

import asyncio


class Deadline:
    """One wait's deadline, from `Deadlines.start` to `end`."""

    __slots__ = ("_queue", "cancelling", "due", "expired", "task")

    def __init__(self, queue: _Queue, due: float, task: asyncio.Task[object]) -> None:
        self._queue = queue
        self.due = due  # loop time
        self.task = task
        self.expired = False
        self.cancelling = task.cancelling()  # cancellations already pending when the wait began

    def end(self) -> None:
        self._queue.entries.pop(self, None)

    def timed_out(self) -> bool:
        """After a CancelledError: whether it was this deadline's, and no other cancellation is
        pending (then it is taken back, and the wait should raise its timeout error)."""
        return self.expired and self.task.uncancel() <= self.cancelling


class _Queue:
    """The waits with one length of deadline, oldest first (a dict keeps insertion order)."""

    __slots__ = ("entries", "handle", "loop", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.entries: dict[Deadline, None] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.handle: asyncio.TimerHandle | None = None

    def add(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object]) -> Deadline:
        entry = Deadline(self, loop.time() + self.seconds, task)
        self.entries[entry] = None
        if self.handle is None or self.loop is not loop:  # a queue outlives a test's event loop
            self.loop = loop
            self.handle = loop.call_at(entry.due, self.fire)
        return entry

    def fire(self) -> None:
        self.handle = None
        loop = self.loop
        assert loop is not None
        now = loop.time()
        entries = self.entries
        while entries:
            entry = next(iter(entries))
            if entry.due > now:
                self.handle = loop.call_at(entry.due, self.fire)
                return
            del entries[entry]
            entry.expired = True
            entry.task.cancel()


class Deadlines:
    def __init__(self) -> None:
        self._queues: dict[float, _Queue] = {}

    def start(self, seconds: float) -> Deadline:
        """A deadline `seconds` from now for the current task's wait; `end()` it when the wait ends."""
        queue = self._queues.get(seconds)
        if queue is None:
            queue = self._queues[seconds] = _Queue(seconds)
        task = asyncio.current_task()
        assert task is not None
        return queue.add(asyncio.get_running_loop(), task)
