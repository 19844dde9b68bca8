"""The gateway in front of a real Ollama server running a real model (SmolLM2-135M on the CPU).

Answers at temperature 0 are compared with what the same Ollama returns directly, so the test
knows nothing about what the model says, only that the gateway changed nothing on the way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypedDict

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.config import Config, parse_config
from gateway.llm import LLMMessage, LLMProviderFactory, LLMRole
from tests.engines import SMOLLM2, TINY, RealOllama
from tests.fakes.ollama_server import FakeOllama
from tests.servers import ServerThread, serve

pytestmark = pytest.mark.e2e
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
# A schema llama.cpp cannot turn into a grammar: Ollama answers it with 500 "invalid JSON schema in format".
UNUSABLE: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "frobnicate"}}}


@pytest.fixture
def gateway(real_ollama: RealOllama, start_gateway: Callable[..., ServerThread]) -> ServerThread:
    config: Config = parse_config(
        {
            "backends": [{"name": "real", "type": "ollama", "base_url": real_ollama.url}],
            "models": [
                {"name": "smol", "deployments": [{"backend": "real", "model": SMOLLM2}]},
                {"name": "tiny", "deployments": [{"backend": "real", "model": TINY}]},
                {"name": "*", "deployments": [{"backend": "real"}]},
            ],
        },
        "test",
    )
    return start_gateway(config)


def direct(real_ollama: RealOllama, **options: object) -> dict[str, Any]:
    body = {"model": SMOLLM2, "messages": QUESTION, "stream": False, "options": options}
    answer: dict[str, Any] = httpx.post(real_ollama.url + "/api/chat", json=body, timeout=120).json()
    return answer


def test_non_streaming_matches_ollama_itself(real_ollama: RealOllama, gateway: ServerThread) -> None:
    expected = direct(real_ollama, temperature=0, seed=1, num_predict=16)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=120) as api:
        reply = api.chat.completions.create(
            model="smol", messages=QUESTION, temperature=0, seed=1, max_tokens=16
        )
    assert reply.choices[0].message.content == expected["message"]["content"]
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        expected["prompt_eval_count"],
        expected["eval_count"],
    )
    assert reply.choices[0].finish_reason == ("length" if expected["done_reason"] == "length" else "stop")


def test_streaming_matches_ollama_itself(real_ollama: RealOllama, gateway: ServerThread) -> None:
    expected = direct(real_ollama, temperature=0, seed=1, num_predict=12)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=120) as api:
        chunks = list(
            api.chat.completions.create(
                model="smol",
                messages=QUESTION,
                temperature=0,
                seed=1,
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["message"]["content"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected["eval_count"]


def test_a_text_completion_is_the_prompt_as_a_chat_message(
    real_ollama: RealOllama, gateway: ServerThread
) -> None:
    # What the model answers to the prompt as one user message, through its chat template.
    expected = direct(real_ollama, temperature=0, seed=1, num_predict=12)
    prompt = str(QUESTION[0]["content"])
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=120) as api:
        reply = api.completions.create(model="smol", prompt=prompt, temperature=0, seed=1, max_tokens=12)
        streamed = list(
            api.completions.create(
                model="smol", prompt=[prompt, prompt], temperature=0, seed=1, max_tokens=12, stream=True
            )
        )
    assert reply.choices[0].text == expected["message"]["content"]
    assert reply.usage is not None and reply.usage.completion_tokens == expected["eval_count"]
    for index in (0, 1):
        text = "".join(choice.text for chunk in streamed for choice in chunk.choices if choice.index == index)
        assert text == expected["message"]["content"]


def test_models_come_from_the_real_tags(gateway: ServerThread) -> None:
    ids = {m["id"] for m in httpx.get(gateway.url + "/v1/models").json()["data"]}
    assert {"smol", SMOLLM2} <= ids


def test_a_model_ollama_lacks_gets_the_pull_hint_and_is_not_pulled(
    real_ollama: RealOllama, gateway: ServerThread
) -> None:
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "llama9:1b", "messages": QUESTION}, timeout=30
    )
    assert response.status_code == 404
    assert "ollama pull llama9:1b" in response.json()["error"]["message"]
    tags = {m["name"] for m in httpx.get(real_ollama.url + "/api/tags").json()["models"]}
    assert "llama9:1b" not in tags


@pytest.mark.anyio
async def test_library_api_against_the_real_server(real_ollama: RealOllama) -> None:
    async with LLMProviderFactory.create("ollama", {"base_url": real_ollama.url, "model": SMOLLM2}) as llm:
        assert await llm.is_model_available()
        reply = await llm.generate([LLMMessage(LLMRole.USER, "Say hello.")], temperature=0, max_tokens=8)
        pieces = [t async for t in llm.generate_stream([LLMMessage(LLMRole.USER, "Say hi.")], max_tokens=6)]
    assert reply.content
    assert 0 < reply.usage["completion_tokens"] <= 8
    assert "".join(pieces)


def test_client_disconnect_stops_the_real_generation(real_ollama: RealOllama, gateway: ServerThread) -> None:
    def cpu_over(seconds: float) -> float:
        before = real_ollama.runner_cpu_seconds()
        time.sleep(seconds)
        return real_ollama.runner_cpu_seconds() - before

    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        generating = cpu_over(1.0)
    time.sleep(0.5)  # the gateway closes the upstream; Ollama cancels the runner's work
    after = cpu_over(1.0)
    assert generating > 0.3, (
        f"the runner should be busy while streaming (used {generating:.2f} s of CPU in 1 s)"
    )
    assert after < 0.1 * generating, (
        f"the runner kept working after the disconnect ({after:.2f} s vs {generating:.2f} s)"
    )


def test_a_prompt_longer_than_the_context_is_served_and_reported(
    real_ollama: RealOllama, gateway: ServerThread
) -> None:
    long = [{"role": "user", "content": "word " * 3000}]  # SmolLM2 is registered with num_ctx 2048
    answer = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "smol", "messages": long, "max_tokens": 2},
        timeout=120,
    )
    assert answer.status_code == 200
    assert answer.headers["x-phoenix-prompt-truncated"] == "2048"
    assert answer.json()["usage"]["prompt_tokens"] == 2048
    short = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "smol", "messages": QUESTION, "max_tokens": 2},
        timeout=60,
    )
    assert "x-phoenix-prompt-truncated" not in short.headers
    body = {"model": "smol", "messages": long, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=120) as streamed:
        lines = list(streamed.iter_lines())
    events = [line for line in lines if line]
    assert ": prompt_truncated=2048" in events
    assert events.index(": prompt_truncated=2048") < events.index("data: [DONE]") == len(events) - 1


def test_embeddings_are_ollamas_own(real_ollama: RealOllama, gateway: ServerThread) -> None:
    inputs = ["The capital of France is Paris.", "A cat sat on the mat."]
    expected = httpx.post(
        real_ollama.url + "/api/embed", json={"model": SMOLLM2, "input": inputs}, timeout=60
    ).json()
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=60) as api:
        floats = api.embeddings.create(model="smol", input=inputs, encoding_format="float")
        packed = api.embeddings.create(model="smol", input=inputs)  # the SDK asks for base64
    assert [item.embedding for item in floats.data] == expected["embeddings"]
    assert floats.usage.prompt_tokens == expected["prompt_eval_count"]
    for item, vector in zip(packed.data, expected["embeddings"], strict=True):
        assert item.embedding == pytest.approx(vector, rel=1e-6, abs=1e-7)  # float32 on the wire


def test_embeddings_get_the_dimensions_asked_for_from_an_ollama_that_ignores_them(
    real_ollama: RealOllama, gateway: ServerThread
) -> None:
    inputs = ["The capital of France is Paris.", "A cat sat on the mat."]
    direct = httpx.post(
        real_ollama.url + "/api/embed", json={"model": SMOLLM2, "input": inputs, "dimensions": 8}, timeout=60
    ).json()["embeddings"]
    size = len(direct[0])
    assert size > 8, "precondition: this Ollama ignores `dimensions`"
    expected = []
    for vector in direct:  # what newer Ollama answers: normalize(vector[:dimensions])
        norm = sum(value * value for value in vector[:8]) ** 0.5
        expected.append([value / norm for value in vector[:8]])
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=60) as api:
        floats = api.embeddings.create(model="smol", input=inputs, dimensions=8, encoding_format="float")
        packed = api.embeddings.create(model="smol", input=inputs, dimensions=8)  # the SDK asks for base64
        with pytest.raises(openai.BadRequestError) as caught:
            api.embeddings.create(model="smol", input=inputs, dimensions=size + 1)
    for item, vector in zip([*floats.data, *packed.data], expected * 2, strict=True):
        assert item.embedding == pytest.approx(vector, rel=1e-5, abs=1e-6)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "dimensions"
    assert f"{size}-dimensional" in caught.value.message


class ChatBody(TypedDict):
    """A request sent both as JSON and through the SDK."""

    model: str
    messages: list[ChatCompletionMessageParam]
    temperature: float
    seed: int
    max_tokens: int


def stream_lines(url: str, body: dict[str, object]) -> list[str]:
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line]


def test_a_real_stream_that_ends_without_done_ends_with_a_defined_error(
    real_ollama: RealOllama, gateway: ServerThread
) -> None:
    # The random model at temperature 0 repeats itself, and this Ollama build then stops the
    # stream early without its final `done` line (seen after about 30 chunks).
    options = {"temperature": 0, "seed": 1, "num_predict": 256}
    native = stream_lines(
        real_ollama.url + "/api/chat", {"model": TINY, "messages": QUESTION, "options": options}
    )
    assert json.loads(native[-1])["done"] is False, "precondition: Ollama itself ends without done"
    assert len(native) < 256

    body = ChatBody(model="tiny", messages=QUESTION, temperature=0, seed=1, max_tokens=256)
    events = stream_lines(gateway.url + "/v1/chat/completions", {**body, "stream": True})
    assert "data: [DONE]" not in events
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_incomplete"
    relayed = "".join(
        json.loads(event.removeprefix("data: "))["choices"][0]["delta"].get("content") or ""
        for event in events[:-1]
    )
    assert relayed == "".join(json.loads(line)["message"]["content"] for line in native)

    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=60) as api:
        with pytest.raises(openai.APIError, match="without its final 'done'"):
            list(api.chat.completions.create(**body, stream=True))
        with pytest.raises(openai.APIStatusError) as caught:
            api.chat.completions.create(**body)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_incomplete"


def test_the_random_model_at_full_speed_matches_ollamas_counts(
    real_ollama: RealOllama, gateway: ServerThread
) -> None:
    options = {"temperature": 0.8, "seed": 3, "num_predict": 200}
    expected = httpx.post(
        real_ollama.url + "/api/chat",
        json={"model": TINY, "messages": QUESTION, "stream": False, "options": options},
        timeout=60,
    ).json()
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=60) as api:
        reply = api.chat.completions.create(
            model="tiny",
            messages=QUESTION,
            temperature=0.8,
            seed=3,
            max_tokens=200,
        )
    assert reply.choices[0].message.content == expected["message"]["content"]
    assert expected["done_reason"] == "length"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == expected["eval_count"] == 200


@pytest.mark.parametrize(
    ("native", "sent", "param"),
    [
        ({"options": {"stop": "x"}}, {"options": {"stop": "x"}}, "options.stop"),
        ({"options": {"num_ctx": "x"}}, {"options": {"num_ctx": "x"}}, "options.num_ctx"),
        (
            {"format": UNUSABLE},
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": UNUSABLE}}},
            "response_format",
        ),
    ],
)
def test_what_ollama_answers_with_500_for_the_requests_own_fault_is_a_400(
    real_ollama: RealOllama,
    gateway: ServerThread,
    native: dict[str, Any],
    sent: dict[str, Any],
    param: str,
) -> None:
    body = {"model": TINY, "messages": QUESTION, "stream": False, **native}
    direct = httpx.post(real_ollama.url + "/api/chat", json=body, timeout=60)
    with serve(FakeOllama(models=[TINY]).app) as fake:  # the fake the other tests use says the same
        faked = httpx.post(fake.url + "/api/chat", json=body, timeout=10)
    assert (faked.status_code, faked.json()) == (direct.status_code, direct.json())
    assert direct.status_code == 500, "precondition: Ollama answers it with a 500"
    for stream in (False, True, False):  # three: as many failures as eject an instance
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "tiny", "messages": QUESTION, "max_tokens": 2, "stream": stream, **sent},
            timeout=60,
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param
        assert response.json()["error"]["message"] == f"Ollama rejected the request: {direct.json()['error']}"
    assert httpx.get(gateway.url + "/readyz").status_code == 200
