"""StreamRelay on its own: what one backend read carried goes to the client in one write, and the
bookkeeping (usage, first token, one finish) is the same as chunk by chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from gateway.exchange import Exchange
from gateway.relay import StreamRelay, StreamSource
from gateway.schemas import Chunk, Usage

pytestmark = pytest.mark.anyio


async def relayed(batches: list[list[Chunk]]) -> tuple[list[bytes], Exchange, list[int]]:
    async def rest() -> AsyncIterator[list[Chunk]]:
        for batch in batches[1:]:
            yield batch

    released: list[int] = []
    finished: list[int] = []
    exchange = Exchange(request_id="r", endpoint="chat")
    source = StreamSource(
        batches[0], rest(), idle_timeout=5, deadline=1e12, on_close=lambda: released.append(1)
    )
    relay = StreamRelay(
        source, exchange, model="m", include_usage=True, finish=finished.append, on_unexpected=print
    )
    writes = [data async for data in relay.body()]
    assert released == [1]
    return writes, exchange, finished


async def test_a_batch_is_one_write_and_the_stream_reads_the_same() -> None:
    burst = [Chunk(content="a"), Chunk(content="b"), Chunk(content="c")]
    end = [Chunk(finish_reason="stop", usage=Usage(prompt_tokens=4, completion_tokens=3))]
    writes, exchange, finished = await relayed([burst, end])
    assert len(writes) == 4  # the burst, the finish, the usage chunk, [DONE]
    events = [line.removeprefix(b"data: ") for data in writes for line in data.split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "abc"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == 7
    assert finished == [200]
    assert exchange.usage is not None and exchange.usage.completion_tokens == 3
    assert exchange.first_token_at is not None and exchange.time_per_token is not None
