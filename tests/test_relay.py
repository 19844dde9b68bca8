"""The stream relay's writes: the chunks of one upstream read leave as one write."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from starlette.types import Message

from gateway import relay as relay_module
from gateway.errors import ShuttingDown
from gateway.eventstream import EventStream
from gateway.exchange import Exchange
from gateway.relay import ChunkEncoder, StreamRelay, StreamSource
from gateway.schemas import Chunk, ToolCallDelta, Usage

pytestmark = pytest.mark.anyio
NOTICE = Chunk(notices={"n": "1"})


async def reads(batches: list[list[Chunk]]) -> AsyncIterator[list[Chunk]]:
    for batch in batches:
        yield batch


async def test_one_write_per_upstream_read_with_every_event_in_order() -> None:
    finished: list[int] = []
    exchange = Exchange(request_id="r", endpoint="chat")
    source = StreamSource(
        first=[Chunk(content="a"), Chunk(content="b")],
        rest=reads([[Chunk(content="c")], [Chunk(finish_reason="stop", usage=Usage(3, 2)), NOTICE]]),
        idle_timeout=5,
        deadline=time.perf_counter() + 5,
        on_close=lambda _: None,
    )
    relay = StreamRelay(
        source, exchange, model="m", include_usage=True, finish=finished.append, on_unexpected=lambda e: None
    )
    writes = [data async for data in relay.body()]
    events = [
        [orjson.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: {")]
        for data in writes
    ]
    deltas = [[choice["delta"] for event in write for choice in event["choices"]] for write in events]
    assert deltas[:3] == [
        [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}],
        [{"content": "c"}],
        [{}],  # the finish event
    ]
    assert writes[2].startswith(b"data: ") and writes[2].endswith(b": n=1\n\n")  # the notice after the finish
    assert events[3][0]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert writes[4] == b"data: [DONE]\n\n"
    assert len(writes) == 5
    assert finished == [200]
    assert exchange.first_token_at is not None


TEXTS = ["plain", 'quote " and \\ slash', "line\nbreak\ttab", "caf\u00e9 \u2603 \U0001f600", "\x00\x1f"]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_a_text_piece_encodes_as_the_whole_event_serialised(text: str, include_usage: bool) -> None:
    encoder = ChunkEncoder("chatcmpl-1", 1700000000, "m", include_usage)
    encoder.encode(Chunk(content="first"))  # the role event goes out with the first piece
    event: dict[str, object] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000}
    event["model"] = "m"
    event["choices"] = [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]
    if include_usage:
        event["usage"] = None
    assert encoder.encode(Chunk(content=text)) == b"data: " + orjson.dumps(event) + b"\n\n"


def test_a_tool_calls_id_and_name_go_out_once_even_when_the_backend_repeats_them() -> None:
    # Clients join a call's fragments by concatenation: a repeated id would become call_1call_1.
    encoder = ChunkEncoder("chatcmpl-1", 1700000000, "m", False)
    calls: list[dict[str, Any]] = []
    for piece in ('{"city": ', '"Lima"}'):
        call = ToolCallDelta(index=0, id="call_1", name="get_weather", arguments=piece)
        for event in encoder.encode(Chunk(tool_calls=[call])).split(b"\n\n")[:-1]:
            delta = orjson.loads(event.removeprefix(b"data: "))["choices"][0]["delta"]
            calls += delta.get("tool_calls") or []
    assert calls == [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": '},
        },
        {"index": 0, "function": {"arguments": '"Lima"}'}},
    ]


def test_fields_a_backend_adds_to_a_tool_call_go_out_with_the_fragment_that_had_them() -> None:
    encoder = ChunkEncoder("chatcmpl-1", 1700000000, "m", False)
    signed = {"extra_content": {"google": {"thought_signature": "CtMB"}}}
    calls: list[dict[str, Any]] = []
    for call in (
        ToolCallDelta(index=0, id="call_1", name="f", arguments="{", extra=signed),
        ToolCallDelta(index=0, arguments="}", extra={"vendor": 1}),
    ):
        for event in encoder.encode(Chunk(tool_calls=[call])).split(b"\n\n")[:-1]:
            calls += (
                orjson.loads(event.removeprefix(b"data: "))["choices"][0]["delta"].get("tool_calls") or []
            )
    assert calls == [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": "{"},
            **signed,
        },
        {"index": 0, "function": {"arguments": "}"}, "vendor": 1},
    ]


# ---- EventStream: how a stream that stops early is recorded ----


class Client:
    """An ASGI client for one SSE response: `blocked_write` makes that body write hang (a slow
    socket), `leave` makes the next receive() say the client has gone."""

    def __init__(self, blocked_write: int | None = None) -> None:
        self.bodies: list[bytes] = []
        self.blocked_write = blocked_write
        self.writing = asyncio.Event()
        self.gone = asyncio.Event()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            if len(self.bodies) == self.blocked_write:
                self.writing.set()
                await asyncio.Event().wait()
            self.bodies.append(message["body"])

    async def receive(self) -> dict[str, str]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def endless() -> AsyncIterator[list[Chunk]]:
    while True:
        await asyncio.sleep(0.01)
        yield [Chunk(content="x")]


def relayed(
    closed: list[str], finished: list[int], rest: AsyncIterator[list[Chunk]] | None = None
) -> tuple[StreamRelay, Exchange]:
    exchange = Exchange(request_id="r", endpoint="chat")
    source = StreamSource(
        first=[Chunk(content="a")],
        rest=rest or endless(),
        idle_timeout=5,
        deadline=time.perf_counter() + 5,
        on_close=lambda _: closed.append("upstream"),
    )
    relay = StreamRelay(
        source, exchange, model="m", include_usage=False, finish=finished.append, on_unexpected=lambda e: None
    )
    return relay, exchange


async def test_a_client_that_leaves_stops_the_stream_as_a_499() -> None:
    closed: list[str] = []
    finished: list[int] = []
    relay, exchange = relayed(closed, finished)
    client = Client()
    response = EventStream(relay.body(), {}, on_client_gone=relay.client_gone)
    task = asyncio.ensure_future(response({}, client.receive, client.send))
    while len(client.bodies) < 3:
        await asyncio.sleep(0.01)
    client.gone.set()
    await asyncio.wait_for(task, 2)
    assert not task.cancelled() and task.exception() is None
    assert closed == ["upstream"] and finished == [499]
    assert exchange.error_type is None
    assert not any(b"error" in body for body in client.bodies)


async def test_a_client_that_stops_reading_is_cut_after_the_stall_limit_as_a_499(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The socket is open but nothing is taken: the write waits, and the backend would wait with it.
    monkeypatch.setattr(relay_module, "CLIENT_STALL_SECONDS", 0.2)
    closed: list[str] = []
    finished: list[int] = []
    relay, exchange = relayed(closed, finished)
    client = Client(blocked_write=2)
    response = EventStream(relay.body(), {}, on_client_gone=relay.client_gone, stalled=relay.client_stalled)
    task = asyncio.ensure_future(response({}, client.receive, client.send))
    await asyncio.wait_for(client.writing.wait(), 2)
    done, _ = await asyncio.wait({task}, timeout=2)  # not left waiting on the write
    if not done:
        client.blocked_write = None  # let it end, then fail
        task.cancel()
    assert done and task.exception() is None
    assert closed == ["upstream"] and finished == [499]
    assert exchange.notes["cut"] == "client stopped reading"


async def test_a_finished_stream_ends_with_its_done_event_before_its_bookkeeping() -> None:
    """`data: [DONE]` goes out as the response's last body, in the same message as its end; the
    upstream is closed and the request recorded (a 200) after that."""

    async def two_more() -> AsyncIterator[list[Chunk]]:
        yield [Chunk(content="b")]
        yield [Chunk(finish_reason="stop")]

    closed: list[str] = []
    finished: list[int] = []
    relay, _ = relayed(closed, finished, rest=two_more())
    ends: list[tuple[bytes, list[str], list[int]]] = []  # (body, closed, finished) as the end went out

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            ends.append((message["body"], list(closed), list(finished)))

    async def receive() -> dict[str, str]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    await asyncio.wait_for(EventStream(relay.body(), {})({}, receive, send), 2)
    assert ends == [(b"data: [DONE]\n\n", [], [])]
    assert closed == ["upstream"] and finished == [200]


@pytest.mark.parametrize("blocked_write", [None, 2], ids=["waiting-upstream", "writing"])
async def test_a_server_cancellation_is_a_503_with_an_error_event(blocked_write: int | None) -> None:
    """uvicorn cancels the request's task at its shutdown deadline; whether that lands while the
    body waits for the backend or while a write waits for the client, it is recorded as the
    server's cut, and the client is told."""
    closed: list[str] = []
    finished: list[int] = []
    relay, exchange = relayed(closed, finished)
    client = Client(blocked_write)
    response = EventStream(relay.body(), {}, on_client_gone=relay.client_gone)
    task = asyncio.ensure_future(response({}, client.receive, client.send))
    if blocked_write is None:
        while len(client.bodies) < 2:
            await asyncio.sleep(0.01)
    else:
        await asyncio.wait_for(client.writing.wait(), 2)
        client.blocked_write = None  # the writes after the cut go through
    task.cancel()
    await asyncio.wait_for(task, 2)
    assert not task.cancelled()
    assert closed == ["upstream"] and finished == [503]
    assert exchange.error_type == ShuttingDown().error_type
    assert orjson.loads(client.bodies[-2].removeprefix(b"data: "))["error"]["code"] == "shutting_down"
    assert client.bodies[-1] == b""


class Ticks:
    """relay's `time`, with perf_counter a clock that moves one second a call."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now

    def time(self) -> float:
        return time.time()


@pytest.mark.parametrize(
    ("choices", "reasoning", "usage", "expected"),
    [
        (1, "", Usage(5, 10), 9),  # 10 tokens: 9 after the first
        (2, "", Usage(5, 20), 9),  # two answers of 10 side by side
        (1, "", Usage(5, 30, reasoning_tokens=20), 9),  # 20 thought before the first token, unshown
        (1, "hm", Usage(5, 30, reasoning_tokens=20), 29),  # the thinking was relayed: every token counts
        (1, "", Usage(5, 1), None),  # one token: nothing after the first
    ],
)
async def test_time_per_output_token_counts_the_tokens_of_one_answer_after_its_first(
    monkeypatch: pytest.MonkeyPatch, choices: int, reasoning: str, usage: Usage, expected: int | None
) -> None:
    ticks = Ticks()
    monkeypatch.setattr(relay_module, "time", ticks)
    exchange = Exchange(request_id="r", endpoint="chat")
    source = StreamSource(
        first=[Chunk(content="a", reasoning=reasoning)],
        rest=reads([[Chunk(content="b")], [Chunk(finish_reason="stop", usage=usage)]]),
        idle_timeout=5,
        deadline=1e9,
        on_close=lambda _: None,
    )
    relay = StreamRelay(
        source,
        exchange,
        model="m",
        include_usage=False,
        finish=lambda status: None,
        on_unexpected=lambda e: None,
        choices=choices,
    )
    assert [data async for data in relay.body()]
    assert exchange.first_token_at is not None
    if expected is None:
        assert exchange.time_per_token is None
        return
    span = relay._last_output - exchange.first_token_at
    assert span > 0
    assert exchange.time_per_token == pytest.approx(span / expected)
