"""gateway/legacy.py: a text completion request as chat requests, and the answers back in the legacy
shape (log probabilities, several prompts' streams as one)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.legacy import FINISH, TextEncoder, chat_requests, fan_in, joined, legacy_logprobs
from gateway.relay import StreamSource
from gateway.schemas import Choice, Chunk, Completion, CompletionRequest, Usage

pytestmark = pytest.mark.anyio
ENTRIES = [
    {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [{"token": "Hey", "logprob": -0.9}]},
    {
        "token": "!",
        "logprob": -0.1,
        "top_logprobs": [{"token": "!", "logprob": -0.1}, {"token": ".", "logprob": -3}],
    },
]


def test_log_probabilities_take_the_legacy_shape_with_offsets_counted_on() -> None:
    legacy, offset = legacy_logprobs(ENTRIES, 7)
    assert legacy == {
        "tokens": ["Hi", "!"],
        "token_logprobs": [-0.5, -0.1],
        "top_logprobs": [{"Hey": -0.9, "Hi": -0.5}, {"!": -0.1, ".": -3}],
        "text_offset": [7, 9],
    }
    assert offset == 10


def test_finish_reasons_are_the_three_the_legacy_shape_has() -> None:
    assert set(FINISH.values()) == {"stop", "length", "content_filter"}
    assert FINISH["tool_calls"] == "stop"


def test_each_prompt_is_a_chat_request_with_one_user_message_and_the_shared_fields() -> None:
    data: dict[str, Any] = {
        "model": "m",
        "prompt": ["a", "b"],
        "temperature": 0.5,
        "stop": "\n",
        "echo": True,
        "best_of": 1,
        "seed": 3,
        "logit_bias": {"50256": -100},
        "options": {"top_k": 4},  # unknown here, as on chat: passed on
    }
    chats = chat_requests(CompletionRequest.model_validate(data), data)
    assert [chat.messages[0].model_dump(exclude_unset=True) for chat in chats] == [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ]
    assert chats[0].model_dump(exclude_unset=True, exclude={"messages"}) == {
        "model": "m",
        "temperature": 0.5,
        "stop": "\n",
        "seed": 3,
        "max_tokens": 16,
        "logit_bias": {"50256": -100},
        "options": {"top_k": 4},
    }


@pytest.mark.parametrize(("logprobs", "top"), [(0, 0), (3, 3)])
def test_logprobs_k_asks_chat_for_k_alternatives(logprobs: int, top: int) -> None:
    data: dict[str, Any] = {"model": "m", "prompt": "a", "logprobs": logprobs, "max_tokens": 4}
    [chat] = chat_requests(CompletionRequest.model_validate(data), data)
    assert (chat.logprobs, chat.top_logprobs, chat.max_tokens) == (True, top, 4)


def test_answers_are_joined_numbered_by_the_n_asked_for_whatever_came_back() -> None:
    # A backend that returns fewer choices than `n` leaves gaps, not another prompt's numbers.
    first = Completion([Choice(0, "a")], Usage(2, 1, cached_tokens=1))
    second = Completion([Choice(0, "b")], Usage(3, 1), counted=False, notices={"usage": "x"})
    whole = joined([first, second], n=2)
    assert [(choice.index, choice.content) for choice in whole.choices] == [(0, "a"), (2, "b")]
    assert (whole.usage, whole.counted, whole.notices) == (
        Usage(5, 2, cached_tokens=1),
        False,
        {"usage": "x"},
    )


def test_the_stream_encoder_echoes_each_prompt_once_before_its_choice_text() -> None:
    request = CompletionRequest.model_validate({"model": "m", "prompt": ["a:", "b:"], "echo": True, "n": 2})
    encoder = TextEncoder(request, "m")
    texts = [encoder.encode(Chunk(content="x", index=i)) for i in (3, 3, 0)]
    assert [b'"text":"b:x"' in texts[0], b'"text":"x"' in texts[1], b'"text":"a:x"' in texts[2]] == [True] * 3
    assert encoder.encode(Chunk(reasoning="hmm")) == b""  # nothing the legacy shape has


async def _stream(*reads: list[Chunk], delay: float = 0.0, fail: bool = False) -> AsyncIterator[list[Chunk]]:
    for chunks in reads:
        await asyncio.sleep(delay)
        yield chunks
    if fail:
        raise UpstreamTimeout("idle")


class Closed:
    def __init__(self) -> None:
        self.outcomes: list[UpstreamError | None] = []

    def __call__(self, failure: UpstreamError | None) -> None:
        self.outcomes.append(failure)


def _source(
    rest: AsyncIterator[list[Chunk]], closed: Closed, first: list[Chunk] | None = None
) -> StreamSource:
    return StreamSource(first or [], rest, idle_timeout=5.0, deadline=1e12, on_close=closed)


async def test_several_streams_are_one_numbered_by_prompt_with_the_usage_summed() -> None:
    closed = Closed()
    slow = _stream([Chunk(content="b1")], [Chunk(finish_reason="stop", usage=Usage(3, 2))], delay=0.02)
    fast = _stream([Chunk(content="a1", index=1)], [Chunk(finish_reason="stop", index=1, usage=Usage(1, 1))])
    merged = fan_in([_source(fast, closed, [Chunk(content="a0")]), _source(slow, closed)], n=2)
    assert [(c.index, c.content) for c in merged.first] == [(0, "a0")]
    reads = [read async for read in merged.rest]
    chunks = [chunk for read in reads for chunk in read]
    assert [(c.index, c.content) for c in chunks if c.content] == [(1, "a1"), (2, "b1")]
    assert [c.usage for c in chunks if c.usage is not None] == [Usage(4, 3)]  # once, at the end
    assert chunks[-1].usage is not None
    merged.on_close(None)
    assert closed.outcomes == [None, None]


async def test_a_stream_without_a_count_leaves_the_whole_uncounted() -> None:
    closed = Closed()
    merged = fan_in(
        [
            _source(_stream([Chunk(content="a", usage=Usage(1, 1))]), closed),
            _source(_stream([Chunk(content="b")]), closed),
        ],
        n=1,
    )
    chunks = [chunk async for read in merged.rest for chunk in read]
    assert all(chunk.usage is None for chunk in chunks)


async def test_a_failure_ends_the_whole_and_counts_against_its_own_stream_only() -> None:
    closed = Closed()
    endless = _stream(*([Chunk(content="x")] for _ in range(1000)), delay=0.01)
    merged = fan_in([_source(endless, closed), _source(_stream(fail=True), closed)], n=1)
    with pytest.raises(UpstreamTimeout) as failed:
        async for _ in merged.rest:
            pass
    merged.on_close(failed.value)
    assert closed.outcomes == [None, failed.value]
    assert endless.ag_frame is None  # type: ignore[attr-defined]  # closed, not left running


async def test_closing_the_whole_closes_every_stream() -> None:
    streams = [_stream(*([Chunk(content="x")] for _ in range(1000)), delay=0.01) for _ in range(3)]
    merged = fan_in([_source(stream, Closed()) for stream in streams], n=1)
    await anext(merged.rest)
    await merged.rest.aclose()  # type: ignore[attr-defined]
    assert all(stream.ag_frame is None for stream in streams)  # type: ignore[attr-defined]
