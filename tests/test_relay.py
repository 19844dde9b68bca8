"""The stream relay's writes: the chunks of one upstream read leave as one write."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
import pytest

from gateway.exchange import Exchange
from gateway.relay import ChunkEncoder, StreamRelay, StreamSource
from gateway.schemas import Chunk, Usage

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
        on_close=lambda: None,
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
