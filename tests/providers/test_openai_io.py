"""OpenAIProvider against pytest-httpx: when a stream that ends counts as whole, and embeddings."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from pytest_httpx import HTTPXMock

from gateway.config import OpenAIBackend
from gateway.errors import InvalidRequest, UpstreamProtocol, UpstreamRejected
from gateway.providers.openai import OpenAIProvider
from gateway.schemas import ChatRequest, EmbeddingRequest
from tests.providers.streams import httpx_stream

pytestmark = pytest.mark.anyio
URL = "http://vllm.test:8000/v1"


@pytest.fixture
async def provider() -> AsyncIterator[OpenAIProvider]:
    async with httpx.AsyncHTTPTransport() as transport:
        yield OpenAIProvider(OpenAIBackend(name="v", type="openai", base_url=URL), transport)


def event(choices: list[dict[str, object]] | None = None, usage: dict[str, int] | None = None) -> bytes:
    body: dict[str, object] = {"id": "c", "object": "chat.completion.chunk", "choices": choices or []}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


def piece(text: str, index: int = 0, finish: str | None = None) -> dict[str, object]:
    return {"index": index, "delta": {"content": text}, "finish_reason": finish}


USAGE = event(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})


@pytest.mark.parametrize(
    ("n", "events", "whole"),
    [
        (1, [event([piece("a")]), event([piece("", finish="stop")]), USAGE, b"data: [DONE]\n\n"], True),
        (1, [event([piece("a")]), event([piece("", finish="stop")]), USAGE], True),  # a server without [DONE]
        (1, [event([piece("a")]), event([piece("", finish="stop")])], False),  # cut before its usage
        (1, [event([piece("a")])], False),
        (2, [event([piece("a", 0, "stop"), piece("b", 1)]), USAGE], False),  # choice 1 never finished
        (2, [event([piece("a", 0, "stop"), piece("b", 1, "stop")]), USAGE], True),
    ],
    ids=["done", "usage-no-done", "no-usage-no-done", "unfinished", "n2-one-unfinished", "n2-both"],
)
async def test_a_stream_is_whole_with_done_or_every_choice_finished_and_its_usage(
    httpx_mock: HTTPXMock, provider: OpenAIProvider, n: int, events: list[bytes], whole: bool
) -> None:
    httpx_mock.add_response(url=URL + "/chat/completions", stream=httpx_stream(events))
    request = ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": n}
    )

    async def read() -> list[str]:
        return [chunk.content async for chunks in provider.stream(request, "m") for chunk in chunks]

    if whole:
        assert "".join(await read()) in ("a", "ab")
    else:
        with pytest.raises(UpstreamProtocol) as caught:
            await read()
        assert caught.value.code == "upstream_incomplete"


@pytest.mark.parametrize(
    "data", [b'{"message": "model crashed"}', b'{"error": {"message": "model crashed"}}', b"model crashed"]
)
async def test_an_error_event_ends_the_stream_with_the_backends_message(
    httpx_mock: HTTPXMock, provider: OpenAIProvider, data: bytes
) -> None:
    events = [
        event([piece("a")]),
        b"event: error\ndata: " + data + b"\n\n",
        event([piece("", finish="stop")]),
    ]
    httpx_mock.add_response(url=URL + "/chat/completions", stream=httpx_stream([*events, USAGE]))
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(UpstreamRejected, match="reported an error mid-stream: model crashed"):
        _ = [chunk async for chunks in provider.stream(request, "m") for chunk in chunks]


async def test_embeddings_from_a_server_that_ignores_dimensions_get_the_dimensions_asked_for(
    httpx_mock: HTTPXMock, provider: OpenAIProvider
) -> None:
    full = {
        "data": [{"index": 1, "embedding": [0.0, 0.0, 0.6, 0.8]}, {"index": 0, "embedding": [3.0, 4.0, 9.0]}]
    }
    httpx_mock.add_response(url=URL + "/embeddings", json=full)
    result = await provider.embed(EmbeddingRequest(model="e", input=["a", "b"], dimensions=2), "m")
    assert result.vectors == [pytest.approx([0.6, 0.8]), [0.0, 0.0]]  # cut, at unit length, in order
    assert not result.counted  # the answer had no usage: its zeros are no count
    sent = httpx_mock.get_request()
    assert sent is not None and orjson.loads(sent.content)["dimensions"] == 2  # still asked for

    httpx_mock.add_response(url=URL + "/embeddings", json={"data": [{"index": 0, "embedding": [0.6, 0.8]}]})
    with pytest.raises(InvalidRequest) as refused:
        await provider.embed(EmbeddingRequest(model="e", input="a", dimensions=8), "m")
    assert refused.value.param == "dimensions"
    assert "makes 2-dimensional embeddings" in refused.value.message
