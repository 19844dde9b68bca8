"""OllamaProvider's I/O against pytest-httpx: what it sends, how it reads, how failures map."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from pytest_httpx import HTTPXMock

from gateway.config import OllamaBackend
from gateway.errors import (
    InvalidRequest,
    ModelNotFound,
    UpstreamProtocol,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers import base, ollama
from gateway.providers.ollama import OllamaProvider
from gateway.schemas import ChatRequest, Chunk, EmbeddingRequest
from tests.providers.streams import httpx_stream

pytestmark = pytest.mark.anyio
URL = "http://ollama.test:11434"
CHAT = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
async def provider() -> AsyncIterator[OllamaProvider]:
    async with httpx.AsyncHTTPTransport() as transport:
        yield OllamaProvider(
            OllamaBackend(name="o", type="ollama", base_url=URL), transport, api_key="secret"
        )


async def test_complete_posts_native_chat_with_bearer(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    httpx_mock.add_response(
        url=URL + "/api/chat",
        json={"message": {"role": "assistant", "content": "yo"}, "done": True, "eval_count": 1},
    )
    completion = await provider.complete(CHAT, "llama3.2:latest")
    assert completion.choices[0].content == "yo"
    sent = httpx_mock.get_request()
    assert sent is not None
    assert sent.headers["authorization"] == "Bearer secret"
    assert orjson.loads(sent.content)["model"] == "llama3.2:latest"


async def test_stream_reassembles_lines_split_across_reads(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    lines = (
        b'{"message":{"content":"Hel"},"done":false}\n'
        b'{"message":{"content":"lo"},"done":false}\n'
        b'{"message":{"content":""},"done":true,"done_reason":"length","prompt_eval_count":3,"eval_count":2}\n'
    )
    pieces = [lines[i : i + 7] for i in range(0, len(lines), 7)]
    httpx_mock.add_response(url=URL + "/api/chat", stream=httpx_stream(pieces))
    httpx_mock.add_response(url=URL + "/api/show", json={"parameters": "num_ctx                        2048"})
    chunks = [chunk async for chunks in provider.stream(CHAT, "m") for chunk in chunks]
    assert "".join(c.content for c in chunks) == "Hello"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5


async def test_stream_with_garbage_line_is_a_protocol_error(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    httpx_mock.add_response(
        url=URL + "/api/chat", stream=httpx_stream([b'{"message":{"content":"a"}}\n<html>\n'])
    )
    httpx_mock.add_response(url=URL + "/api/show", json={}, is_optional=True)  # asked once the answer begins
    with pytest.raises(UpstreamProtocol, match="malformed JSON"):
        _ = [chunk async for chunks in provider.stream(CHAT, "m") for chunk in chunks]


async def test_stream_yields_the_first_chunk_alone_then_each_reads_chunks_together(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    line = b'{"message":{"content":"%s"},"done":false}\n'
    reads = [line % b"a" + line % b"b" + line % b"c", line % b"d", line % b"e" + b"<html>\n" + line % b"f"]
    httpx_mock.add_response(url=URL + "/api/chat", stream=httpx_stream(reads))
    httpx_mock.add_response(url=URL + "/api/show", json={}, is_optional=True)  # asked once the answer begins
    batches: list[list[str]] = []
    with pytest.raises(UpstreamProtocol, match="malformed JSON"):
        async for chunks in provider.stream(CHAT, "m"):
            batches.append([chunk.content for chunk in chunks])
    # the first token goes ahead of the rest of its read; a bad line's predecessors come before its error
    assert batches == [["a"], ["b", "c"], ["d"], ["e"]]


async def test_stream_error_status_maps_before_any_chunk(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    httpx_mock.add_response(url=URL + "/api/chat", status_code=404, json={"error": 'model "m" not found'})
    with pytest.raises(ModelNotFound, match="ollama pull m"):
        _ = [chunk async for chunks in provider.stream(CHAT, "m") for chunk in chunks]


async def test_connection_refused_names_the_server(httpx_mock: HTTPXMock, provider: OllamaProvider) -> None:
    httpx_mock.add_exception(httpx.ConnectError("refused"))
    with pytest.raises(UpstreamUnavailable, match=f"Cannot connect to Ollama server at {URL}"):
        await provider.complete(CHAT, "m")


async def test_read_timeout_is_an_upstream_timeout(httpx_mock: HTTPXMock, provider: OllamaProvider) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("slow"))
    with pytest.raises(UpstreamTimeout):
        await provider.complete(CHAT, "m")


async def test_embed_sends_input_and_dimensions(httpx_mock: HTTPXMock, provider: OllamaProvider) -> None:
    httpx_mock.add_response(url=URL + "/api/embed", json={"embeddings": [[0.1, 0.2]], "prompt_eval_count": 2})
    result = await provider.embed(EmbeddingRequest(model="e", input="two words", dimensions=2), "e:latest")
    assert (result.vectors, result.prompt_tokens) == ([[0.1, 0.2]], 2)
    request = httpx_mock.get_request()
    assert request is not None
    assert orjson.loads(request.content) == {"model": "e:latest", "input": "two words", "dimensions": 2}


async def test_embed_cuts_vectors_ollama_left_full_length_to_dimensions_at_unit_length(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    # Ollama 0.5.4 ignores `dimensions`; newer servers answer normalize(vector[:dimensions])
    full = [[0.3, 0.4, 0.5, 0.7], [0.0, 0.0, 0.6, 0.8], [-3.0, 4.0, 99.0, 1.0]]
    httpx_mock.add_response(url=URL + "/api/embed", json={"embeddings": full, "prompt_eval_count": 3})
    result = await provider.embed(EmbeddingRequest(model="e", input=["a", "b", "c"], dimensions=2), "e")
    assert result.vectors == [
        pytest.approx([0.6, 0.8]),
        [0.0, 0.0],  # a zero vector stays zero, as Ollama leaves it
        pytest.approx([-0.6, 0.8]),
    ]
    request = httpx_mock.get_request()
    assert request is not None
    assert orjson.loads(request.content)["dimensions"] == 2  # still asked for: newer servers apply it


async def test_embed_asking_more_dimensions_than_the_model_has_is_refused_naming_dimensions(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    httpx_mock.add_response(url=URL + "/api/embed", json={"embeddings": [[0.6, 0.8]]})
    with pytest.raises(InvalidRequest) as caught:
        await provider.embed(EmbeddingRequest(model="e", input="a", dimensions=8), "e:latest")
    assert caught.value.param == "dimensions"
    assert caught.value.message == (
        f"'e:latest' on the Ollama server at {URL} makes 2-dimensional embeddings;"
        " 'dimensions' must be at most 2"
    )


@pytest.mark.parametrize(
    "vector",
    [[], "0.1,0.2,0.3", [0.1, "x", 0.3], [None, None, None]],
    ids=["empty", "string", "mixed", "nulls"],
)
async def test_embed_vectors_that_cannot_be_cut_to_dimensions_are_the_backends_fault(
    httpx_mock: HTTPXMock, provider: OllamaProvider, vector: object
) -> None:
    httpx_mock.add_response(url=URL + "/api/embed", json={"embeddings": [vector]})
    with pytest.raises(UpstreamProtocol, match=f"'e' on the Ollama server at {URL} answered with"):
        await provider.embed(EmbeddingRequest(model="e", input="a", dimensions=2), "e")


async def test_reasoning_effort_becomes_think_only_for_models_whose_capabilities_allow_it(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    shows = {
        "plain": {"capabilities": ["completion", "tools"]},
        "thinker": {"capabilities": ["completion", "thinking"]},
        "old": {"parameters": "num_ctx 2048"},  # older servers (0.5.4) list none: think is sent
    }
    for model, show in shows.items():
        httpx_mock.add_response(url=URL + "/api/show", match_json={"model": model}, json=show)
    final = {"message": {"content": "x"}, "done": True, "eval_count": 1}
    for _ in range(4):
        httpx_mock.add_response(url=URL + "/api/chat", json=final)
    httpx_mock.add_response(url=URL + "/api/chat", stream=httpx_stream([orjson.dumps(final) + b"\n"]))
    asked = CHAT.model_copy(update={"reasoning_effort": "high"})
    for model in ("plain", "thinker", "old", "plain"):
        await provider.complete(asked, model)
    _ = [chunk async for chunks in provider.stream(asked, "plain") for chunk in chunks]
    chats = [orjson.loads(r.content) for r in httpx_mock.get_requests(url=URL + "/api/chat")]
    assert [(chat["model"], chat.get("think")) for chat in chats] == [
        ("plain", None),
        ("thinker", "high"),
        ("old", "high"),
        ("plain", None),
        ("plain", None),
    ]
    assert len(httpx_mock.get_requests(url=URL + "/api/show")) == 3  # once per model


async def test_a_prompt_cut_to_the_context_size_is_reported(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    final = {"message": {"content": "x"}, "done": True, "done_reason": "length", "eval_count": 2}
    httpx_mock.add_response(url=URL + "/api/chat", json={**final, "prompt_eval_count": 2048})
    httpx_mock.add_response(url=URL + "/api/show", json={"parameters": 'num_ctx 2048\nstop "<|im_end|>"'})
    httpx_mock.add_response(url=URL + "/api/chat", json={**final, "prompt_eval_count": 2047})
    truncated = await provider.complete(CHAT, "m")
    assert truncated.notices == {"prompt_truncated": "2048"}
    assert (await provider.complete(CHAT, "m")).notices == {}  # the context size is asked once per model
    [show] = [r for r in httpx_mock.get_requests() if r.url.path == "/api/show"]
    assert orjson.loads(show.content) == {"model": "m"}


async def test_the_requests_own_num_ctx_is_used_without_asking(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    final = {"message": {"content": "x"}, "done": True, "prompt_eval_count": 512, "eval_count": 1}
    httpx_mock.add_response(url=URL + "/api/chat", json=final)
    request = CHAT.model_copy(update={"options": {"num_ctx": 512}})
    assert (await provider.complete(request, "m")).notices == {"prompt_truncated": "512"}


async def test_streams_report_truncation_in_a_last_chunk(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    final = {"message": {"content": "a"}, "done": True, "prompt_eval_count": 4096, "eval_count": 1}
    line = orjson.dumps(final) + b"\n"
    httpx_mock.add_response(url=URL + "/api/chat", stream=httpx_stream([line]))
    httpx_mock.add_response(url=URL + "/api/show", json={"parameters": "num_ctx 4096"})
    chunks = [chunk async for chunks in provider.stream(CHAT, "m") for chunk in chunks]
    assert chunks[-1].notices == {"prompt_truncated": "4096"}


@pytest.mark.parametrize(
    "answer",
    [
        {"message": {"role": "assistant", "content": "x", "tool_calls": ["oops"]}, "done": True},
        {
            "message": {"role": "assistant", "content": "x", "images": None, "tool_calls": [{"function": 3}]},
            "done": True,
        },
    ],
    ids=["call-not-an-object", "function-not-an-object"],
)
async def test_an_answer_of_the_wrong_shape_is_the_backends_fault(
    httpx_mock: HTTPXMock, provider: OllamaProvider, answer: dict[str, object]
) -> None:
    httpx_mock.add_response(url=URL + "/api/chat", json=answer)
    with pytest.raises(UpstreamProtocol, match="Ollama answered with JSON of an unexpected shape"):
        await provider.complete(CHAT, "m")


async def test_a_stream_line_of_the_wrong_shape_is_the_backends_fault(
    httpx_mock: HTTPXMock, provider: OllamaProvider
) -> None:
    reads = [b'{"message":{"content":"a"},"done":false}\n', b'{"message":"not an object","done":false}\n']
    httpx_mock.add_response(url=URL + "/api/chat", stream=httpx_stream(reads))
    httpx_mock.add_response(url=URL + "/api/show", json={}, is_optional=True)
    contents = []
    with pytest.raises(UpstreamProtocol, match="Ollama sent a stream event of an unexpected shape"):
        async for chunks in provider.stream(CHAT, "m"):
            contents += [chunk.content for chunk in chunks]
    assert contents == ["a"]  # what came before it still went out


async def test_a_slow_context_size_lookup_does_not_hold_up_a_streams_end(
    httpx_mock: HTTPXMock, provider: OllamaProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ollama, "CONTEXT_WAIT", 0.05)
    final = {"message": {"content": "a"}, "done": True, "prompt_eval_count": 4096, "eval_count": 1}
    for _ in range(2):
        httpx_mock.add_response(url=URL + "/api/chat", stream=httpx_stream([orjson.dumps(final) + b"\n"]))
    answer_show = asyncio.Event()

    async def held_show(request: httpx.Request) -> httpx.Response:
        await answer_show.wait()
        return httpx.Response(200, json={"parameters": "num_ctx 4096"})

    httpx_mock.add_callback(held_show, url=URL + "/api/show")

    async def stream() -> list[Chunk]:
        return [chunk async for chunks in provider.stream(CHAT, "m") for chunk in chunks]

    first = await asyncio.wait_for(stream(), 5)  # ends while /api/show has not answered
    assert first[-1].finish_reason == "stop" and not any(chunk.notices for chunk in first)
    answer_show.set()  # the lookup went on after the stream; the next one has its answer
    monkeypatch.setattr(ollama, "CONTEXT_WAIT", 5.0)
    second = await asyncio.wait_for(stream(), 5)
    assert second[-1].notices == {"prompt_truncated": "4096"}
    assert len(httpx_mock.get_requests(url=URL + "/api/show")) == 1


async def test_a_failed_show_is_asked_again_after_a_while_for_the_truncation_notice(
    httpx_mock: HTTPXMock, provider: OllamaProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr("gateway.providers.ollama.time.monotonic", lambda: now[0])
    answer = {"message": {"content": "yo"}, "done": True, "prompt_eval_count": 2048, "eval_count": 1}
    httpx_mock.add_response(url=URL + "/api/chat", json=answer, is_reusable=True)
    httpx_mock.add_response(url=URL + "/api/show", status_code=500, json={"error": "starting"})
    assert (await provider.complete(CHAT, "m")).notices == {}  # the context size is not known
    now[0] += base.FACTS_RETRY / 2
    assert (await provider.complete(CHAT, "m")).notices == {}  # not asked again so soon
    assert len(httpx_mock.get_requests(url=URL + "/api/show")) == 1
    httpx_mock.add_response(url=URL + "/api/show", json={"parameters": "num_ctx 2048"})
    now[0] += base.FACTS_RETRY
    assert (await provider.complete(CHAT, "m")).notices == {"prompt_truncated": "2048"}  # asked again
    assert len(httpx_mock.get_requests(url=URL + "/api/show")) == 2


async def test_a_show_left_unanswered_holds_up_no_answer_and_is_asked_again_later(
    httpx_mock: HTTPXMock, provider: OllamaProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ollama, "CONTEXT_WAIT", 0.05)
    monkeypatch.setattr(ollama, "FACTS_TIMEOUT", 0.1)
    monkeypatch.setattr(base, "FACTS_RETRY", 0.2)
    answer = {"message": {"content": "yo"}, "done": True, "prompt_eval_count": 2048, "eval_count": 1}
    httpx_mock.add_response(url=URL + "/api/chat", json=answer, is_reusable=True)
    never = asyncio.Event()

    async def stuck_show(request: httpx.Request) -> httpx.Response:
        await never.wait()  # the connection stays open and nothing comes
        return httpx.Response(200, json={})

    httpx_mock.add_callback(stuck_show, url=URL + "/api/show")
    # the answer waits CONTEXT_WAIT for the lookup, not for the lookup's end
    assert (await asyncio.wait_for(provider.complete(CHAT, "m"), 5)).notices == {}
    assert (await asyncio.wait_for(provider.complete(CHAT, "m"), 5)).notices == {}
    httpx_mock.add_response(url=URL + "/api/show", json={"parameters": "num_ctx 2048"})
    await asyncio.sleep(0.1 + 0.2)  # past FACTS_TIMEOUT the stuck lookup has failed; past FACTS_RETRY...
    monkeypatch.setattr(ollama, "CONTEXT_WAIT", 5.0)
    completion = await asyncio.wait_for(provider.complete(CHAT, "m"), 5)
    assert completion.notices == {"prompt_truncated": "2048"}  # ...it is asked again
    assert len(httpx_mock.get_requests(url=URL + "/api/show")) == 2


async def test_the_lookups_kept_are_bounded_whatever_names_clients_send(
    httpx_mock: HTTPXMock, provider: OllamaProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pattern route passes on any name a client sends: each name's /api/show (answered 404 for
    names the server lacks) must not be kept for good."""
    monkeypatch.setattr(base, "FACTS_KEPT", 8)
    httpx_mock.add_response(
        url=URL + "/api/show", status_code=404, json={"error": "not found"}, is_reusable=True
    )
    names = [f"typo-{n}" for n in range(30)]
    for name in names:
        assert await provider.remote(name) is None  # the lookup failed: not known
    kept = list(provider._facts)
    assert len(kept) == 8
    assert kept == names[-8:]  # the oldest went first
    assert len(httpx_mock.get_requests(url=URL + "/api/show")) == 30
