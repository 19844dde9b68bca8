"""The stream relay's idle and total deadlines, on one timer per stream: a steady stream slower than
nothing but faster than the idle deadline is never cut, a stall is, and so is a stream that outlives
its total deadline; a slow client does not count against the backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from gateway.exchange import Exchange
from gateway.relay import StreamRelay, StreamSource
from gateway.schemas import Chunk

pytestmark = pytest.mark.anyio


async def paced(gaps: list[float]) -> AsyncIterator[list[Chunk]]:
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield [Chunk(content=f"t{i} ", finish_reason="stop" if i == len(gaps) - 1 else None)]


def paced_relay(gaps: list[float], finished: list[int], *, idle: float, total: float) -> StreamRelay:
    """A relay of a first chunk and then one per gap; the status it records goes to `finished`."""
    source = StreamSource(
        first=[Chunk(content="first ")],
        rest=paced(gaps),
        idle_timeout=idle,
        deadline=time.perf_counter() + total,
        on_close=lambda _: None,
    )
    return StreamRelay(
        source,
        Exchange(request_id="r", endpoint="chat"),
        model="m",
        include_usage=False,
        finish=finished.append,
        on_unexpected=lambda error: None,
    )


async def relay(gaps: list[float], *, idle: float, total: float, client_pause: float = 0.0) -> list[str]:
    """The SSE payloads the client gets, and the status the relay recorded, as the last item."""
    finished: list[int] = []
    stream = paced_relay(gaps, finished, idle=idle, total=total)
    payloads = []
    async for data in stream.body():
        payloads += [
            line.removeprefix(b"data: ").decode() for line in data.split(b"\n") if line.startswith(b"data: ")
        ]
        await asyncio.sleep(client_pause)
    return [*payloads, str(finished[0])]


def contents(payloads: list[str]) -> str:
    texts = []
    for payload in payloads[:-1]:
        if payload != "[DONE]" and "choices" in (event := orjson.loads(payload)):
            texts += [choice["delta"].get("content") or "" for choice in event["choices"]]
    return "".join(texts)


async def test_a_steady_stream_under_the_idle_deadline_is_never_cut() -> None:
    payloads = await relay([0.1] * 8, idle=0.4, total=10)  # 0.8 s in all, twice the idle period
    assert payloads[-2:] == ["[DONE]", "200"]
    assert contents(payloads) == "first " + "".join(f"t{i} " for i in range(8))


async def test_a_stall_is_cut_at_the_idle_deadline() -> None:
    started = time.monotonic()
    payloads = await relay([0.05, 0.05, 2.0], idle=0.3, total=10)
    assert 0.35 < time.monotonic() - started < 1.0
    assert payloads[-1] == "504"
    assert "idle deadline" in orjson.loads(payloads[-2])["error"]["message"]
    assert contents(payloads) == "first t0 t1 "


async def test_the_total_deadline_cuts_a_stream_that_never_stalls() -> None:
    started = time.monotonic()
    payloads = await relay([0.1] * 30, idle=0.3, total=0.8)
    assert 0.75 < time.monotonic() - started < 1.3
    assert payloads[-1] == "504"
    assert "total deadline" in orjson.loads(payloads[-2])["error"]["message"]
    assert "[DONE]" not in payloads


async def test_a_slow_client_does_not_count_against_the_backend() -> None:
    payloads = await relay([0.0] * 4, idle=0.1, total=10, client_pause=0.2)  # the client reads slowly
    assert payloads[-2:] == ["[DONE]", "200"]


async def test_a_client_that_leaves_as_the_idle_deadline_fires_is_recorded_as_gone() -> None:
    # Both cancel the stream's task in the same turn of the loop: the client's leaving wins, since
    # nobody is there to be told of the backend's stall (499, not a 504 against the backend).
    finished: list[int] = []
    stream = paced_relay([5.0], finished, idle=0.2, total=10)
    loop = asyncio.get_running_loop()

    async def consume() -> None:
        async for _ in stream.body():
            pass

    task = asyncio.ensure_future(consume())
    while stream._watchdog is None or stream._watchdog._handle is None:
        await asyncio.sleep(0)
    due = stream._watchdog._handle.when()

    def client_left() -> None:  # what the request's Departure does when the client goes
        stream.client_gone()
        task.cancel()

    loop.call_at(due, client_left)  # timers due at the same time run in the same turn
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert finished == [499]
