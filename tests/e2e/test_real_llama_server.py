"""A real llama.cpp server (OpenAI-compatible, no /api/*) as a `type: openai, local: true` backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.config import parse_config
from tests.engines import RealLlamaServer
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, serve

pytestmark = pytest.mark.e2e
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llama() -> Iterator[RealLlamaServer]:
    server = RealLlamaServer("SmolLM2-135M-Instruct.Q4_1.gguf", alias="smollm2")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api(llama: RealLlamaServer, start_gateway: Callable[..., ServerThread]) -> Iterator[openai.OpenAI]:
    config = parse_config(
        {
            "backends": [
                {"name": "llamacpp", "type": "openai", "base_url": llama.url + "/v1", "local": True}
            ],
            "models": [{"name": "local-smol", "deployments": [{"backend": "llamacpp", "model": "smollm2"}]}],
        },
        "test",
    )
    gateway = start_gateway(config)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        yield client


def direct(llama: RealLlamaServer, **fields: Any) -> dict[str, Any]:
    body = {"model": "smollm2", "messages": QUESTION, "temperature": 0, "seed": 1, "max_tokens": 16, **fields}
    answer: dict[str, Any] = httpx.post(llama.url + "/v1/chat/completions", json=body, timeout=120).json()
    return answer


def test_non_streaming_matches_the_server_itself(llama: RealLlamaServer, api: openai.OpenAI) -> None:
    expected = direct(llama)
    reply = api.chat.completions.create(
        model="local-smol", messages=QUESTION, temperature=0, seed=1, max_tokens=16
    )
    assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert reply.choices[0].message.content  # what the model says is its business; equality is ours
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert reply.model == "local-smol"


def test_streaming_matches_and_counts_tokens(llama: RealLlamaServer, api: openai.OpenAI) -> None:
    expected = direct(llama, max_tokens=12)
    chunks = list(
        api.chat.completions.create(
            model="local-smol",
            messages=QUESTION,
            temperature=0,
            seed=1,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["choices"][0]["message"]["content"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert len({c.id for c in chunks}) == 1


def test_usage_is_counted_even_when_the_client_did_not_ask(
    llama: RealLlamaServer, api: openai.OpenAI
) -> None:
    chunks = list(
        api.chat.completions.create(model="local-smol", messages=QUESTION, max_tokens=4, stream=True)
    )
    assert all(c.usage is None for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["length"],
        ["stop"],
    )


def test_embeddings_it_does_not_serve_are_a_400_that_leaves_it_serving_chat(
    llama: RealLlamaServer, api: openai.OpenAI
) -> None:
    direct = httpx.post(llama.url + "/v1/embeddings", json={"model": "smollm2", "input": "x"}, timeout=30)
    assert direct.status_code == 501, "precondition: started without --embeddings"
    with serve(FakeOpenAI(embeddings=False).app) as fake:  # the fake the other tests use says the same
        faked = httpx.post(fake.url + "/v1/embeddings", json={"model": "smollm2", "input": "x"}, timeout=10)
    assert (faked.status_code, faked.json()) == (direct.status_code, direct.json())
    for _ in range(3):  # as many failures as eject an instance
        with pytest.raises(openai.BadRequestError) as caught:
            api.embeddings.create(model="local-smol", input="x")
        assert direct.json()["error"]["message"] in caught.value.message
    reply = api.chat.completions.create(model="local-smol", messages=QUESTION, max_tokens=2)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_a_prompt_longer_than_its_context_is_openais_context_length_exceeded(
    llama: RealLlamaServer, api: openai.OpenAI
) -> None:
    long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "word " * 3000}]  # n_ctx 2048
    direct = httpx.post(
        llama.url + "/v1/chat/completions", json={"model": "smollm2", "messages": long}, timeout=30
    )
    assert direct.json()["error"]["type"] == "exceed_context_size_error", "precondition"
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model="local-smol", messages=long, max_tokens=2, stream=stream)
        assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "messages")
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["message"] == direct.json()["error"]["message"]
