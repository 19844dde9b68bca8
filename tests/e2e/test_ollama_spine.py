"""The spine end to end: the official OpenAI SDK -> the gateway under uvicorn -> a fake Ollama over HTTP."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import httpx
import openai
import orjson
import pytest
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionContentPartInputAudioParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
)

from gateway import relay as relay_module
from gateway.config import Config
from gateway.schemas import MAX_EMBEDDING_INPUTS
from tests.e2e.conftest import ollama_config, sample, scrape, wait_for
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.servers import ServerThread, free_port, serve

pytestmark = pytest.mark.e2e

FakeServer = tuple[FakeOllama, ServerThread]
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


OPEN_CLIENTS: list[openai.OpenAI] = []
# A schema llama.cpp cannot turn into a grammar: Ollama answers it with 500 "invalid JSON schema in format".
UNUSABLE: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "frobnicate"}}}


def client(gateway: ServerThread) -> openai.OpenAI:
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    OPEN_CLIENTS.append(api)
    return api


def test_sync_sdk_non_streaming_chat(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    fake, _ = fake_ollama
    fake.queue(Reply(content="Paris is the capital.", prompt_eval_count=21, eval_count=6))
    reply = client(gateway).chat.completions.create(
        model="llama3.2",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
        temperature=0,
        max_tokens=32,
    )
    assert reply.choices[0].message.content == "Paris is the capital."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "llama3.2"
    assert reply.id.startswith("chatcmpl-")
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (21, 6, 27)
    sent = fake.chat_bodies()[-1]
    assert sent["model"] == "llama3.2:latest"
    assert sent["stream"] is False
    assert sent["options"] == {"temperature": 0, "num_predict": 32}
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]


def test_sync_sdk_streaming_with_usage(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    fake, _ = fake_ollama
    fake.queue(Reply(pieces=["The ", "sky ", "is ", "blue."], prompt_eval_count=9, eval_count=4))
    stream = client(gateway).chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "Sky colour?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The sky is blue."
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (9, 4)
    assert fake.chat_bodies()[-1]["stream"] is True


def test_raw_stream_ends_with_done_and_leaves_usage_out_unless_asked(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    fake, _ = fake_ollama
    fake.queue(Reply(pieces=["a", "b"]))
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-phoenix-backend"] == "ollama-1"
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert all("usage" not in p for p in payloads)
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


@pytest.mark.anyio
async def test_async_sdk_streaming_and_non_streaming(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    fake, _ = fake_ollama
    fake.queue(Reply(content="one"), Reply(pieces=["t", "wo"]))
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as api:
        reply = await api.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "1"}]
        )
        assert reply.choices[0].message.content == "one"
        stream = await api.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "2"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "two"


def test_tool_calls_non_streaming_then_multi_turn(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    fake, _ = fake_ollama
    fake.queue(
        Reply(content="", tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]),
        Reply(content="It is 4C in Oslo."),
    )
    api = client(gateway)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Oslo?"}]
    first = api.chat.completions.create(model="llama3.2", messages=messages, tools=[WEATHER_TOOL])
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].message.tool_calls is not None
    call = first.choices[0].message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert call.id.startswith("call_")
    messages += [
        cast(ChatCompletionAssistantMessageParam, first.choices[0].message.model_dump(exclude_none=True)),
        {"role": "tool", "tool_call_id": call.id, "content": "4C"},
    ]
    second = api.chat.completions.create(model="llama3.2", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "It is 4C in Oslo."
    sent = fake.chat_bodies()[-1]
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert sent["messages"][2] == {
        "role": "tool",
        "content": "4C",
        "tool_name": "get_weather",
        "tool_call_id": call.id,
    }


def test_allowed_tools_reach_ollama_alone_and_an_unknown_one_is_refused(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    fake, _ = fake_ollama
    delete = {"type": "function", "function": {"name": "delete_account", "parameters": {"type": "object"}}}

    def ask(*names: str) -> httpx.Response:
        listed = [{"type": "function", "function": {"name": name}} for name in names]
        choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": listed}}
        messages = [{"role": "user", "content": "Weather in Oslo?"}]
        body = {
            "model": "llama3.2",
            "messages": messages,
            "tools": [WEATHER_TOOL, delete],
            "tool_choice": choice,
        }
        return post(gateway, body)

    assert ask("get_weather").status_code == 200
    assert fake.chat_bodies()[-1]["tools"] == [WEATHER_TOOL]
    sent = len(fake.chat_bodies())
    refused = ask("get_weather", "send_email")
    assert refused.status_code == 400
    assert error_of(refused)["param"] == "tool_choice"
    assert len(fake.chat_bodies()) == sent


@pytest.mark.parametrize("arguments", ["{oops", "[1, 2]", '"Oslo"'], ids=["not-json", "array", "string"])
def test_tool_call_arguments_that_are_not_an_object_are_refused_before_ollama(
    fake_ollama: FakeServer, gateway: ServerThread, arguments: str
) -> None:
    fake, _ = fake_ollama
    call = {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_a", "content": "4C"},
    ]
    response = post(gateway, {"model": "llama3.2", "messages": messages, "tools": [WEATHER_TOOL]})
    assert response.status_code == 400
    error = error_of(response)
    assert (error["param"], error["message"]) == (
        "messages[1].tool_calls[0].function.arguments",
        "tool call arguments must be a JSON object",
    )
    assert fake.chat_bodies() == []


def test_a_tool_result_for_a_call_not_in_the_history_is_refused_before_ollama(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    fake, _ = fake_ollama
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "tool", "tool_call_id": "call_trimmed_history", "content": "4C, light snow"},
    ]
    response = post(gateway, {"model": "llama3.2", "messages": messages, "tools": [WEATHER_TOOL]})
    assert response.status_code == 400
    assert error_of(response)["param"] == "messages[1].tool_call_id"
    assert fake.chat_bodies() == []


def test_tool_calls_streaming_accumulate_cleanly(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    fake, _ = fake_ollama
    calls = [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Lima"}}},
    ]
    fake.queue(Reply(content="", tool_calls=calls))
    with client(gateway).chat.completions.stream(
        model="llama3.2",
        messages=[{"role": "user", "content": "Weather in Oslo and Lima?"}],
        tools=[WEATHER_TOOL],
    ) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.role == "assistant"
    got = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    assert got == [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Lima"})]
    ids = [c.id for c in message.tool_calls or []]
    assert len(set(ids)) == 2
    assert all(i.startswith("call_") and "call_call" not in i for i in ids)


def test_reasoning_effort_reaches_only_thinking_models_as_think(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    fake, _ = fake_ollama
    fake.thinking = ["qwen2.5:0.5b"]  # llama3.2 lacks the capability: Ollama answers 400 to `think`
    api = client(gateway)
    for model in ("llama3.2", "ollama/qwen2.5:0.5b", "llama3.2"):
        reply = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "2+2?"}], reasoning_effort="low"
        )
        assert reply.choices[0].finish_reason == "stop"
    assert [(body["model"], body.get("think")) for body in fake.chat_bodies()] == [
        ("llama3.2:latest", None),
        ("qwen2.5:0.5b", "low"),
        ("llama3.2:latest", None),
    ]
    shows = [body["model"] for path, body in fake.requests if path == "/api/show"]
    assert sorted(shows) == ["llama3.2:latest", "qwen2.5:0.5b"]  # one lookup per model, shared


def test_json_mode_and_json_schema(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    fake, _ = fake_ollama
    fake.queue(Reply(content='{"a": 1}'), Reply(content='{"name": "x"}'))
    api = client(gateway)
    reply = api.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"a": 1}
    schema: dict[str, object] = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
    }
    api.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "name"}],
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    formats = [body.get("format") for body in fake.chat_bodies()[-2:]]
    assert formats == ["json", schema]


def test_image_parts_reach_ollama_as_bare_base64(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    fake, _ = fake_ollama
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    client(gateway).chat.completions.create(
        model="llama3.2",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                ],
            }
        ],
    )
    assert fake.chat_bodies()[-1]["messages"][0] == {
        "role": "user",
        "content": "What is it?",
        "images": [png],
    }


def test_audio_parts_reach_ollama_in_images_and_file_parts_are_refused(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    fake, _ = fake_ollama
    wav = base64.b64encode(b"RIFF$\x00\x00\x00WAVEfmt ").decode()
    audio: ChatCompletionContentPartInputAudioParam = {
        "type": "input_audio",
        "input_audio": {"data": wav, "format": "wav"},
    }
    client(gateway).chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Transcribe this."}, audio]}],
    )
    assert fake.chat_bodies()[-1]["messages"][0] == {
        "role": "user",
        "content": "Transcribe this.",
        "images": [wav],
    }
    sent = len(fake.chat_bodies())
    pdf = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}
    response = post(
        gateway,
        {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Sum up."}, pdf]}],
        },
    )
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", "messages[0].content[1]")
    assert len(fake.chat_bodies()) == sent  # refused before Ollama


def test_embeddings_float_and_base64(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    api = client(gateway)
    floats = api.embeddings.create(model="embed", input=["alpha", "beta gamma"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    raw = httpx.post(
        gateway.url + "/v1/embeddings", json={"model": "embed", "input": "alpha", "encoding_format": "base64"}
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    decoded = list(struct.unpack(f"<{len(packed) // 4}f", packed))
    assert decoded == pytest.approx(floats.data[0].embedding, rel=1e-6)


def test_embeddings_with_a_vector_missing_are_the_instances_fault_and_go_to_the_next(
    start_gateway: Callable[[Config], ServerThread],
) -> None:
    short, whole = (FakeOllama(models=["nomic-embed-text:latest"]) for _ in range(2))
    short.embed_short = True
    with serve(short.app) as first, serve(whole.app) as second:
        config = ollama_config(
            first.url,
            backends=[
                {"name": "ollama-1", "type": "ollama", "base_url": first.url},
                {"name": "ollama-2", "type": "ollama", "base_url": second.url},
            ],
            models=[
                {
                    "name": "embed",
                    "deployments": [{"backend": f"ollama-{i}", "model": "nomic-embed-text"} for i in (1, 2)],
                }
            ],
            routing={"strategy": "round_robin", "retries": 1},
        )
        gateway = start_gateway(config)
        answers = [
            httpx.post(gateway.url + "/v1/embeddings", json={"model": "embed", "input": ["a", "b"]})
            for _ in range(2)
        ]
        samples = scrape(gateway.url)
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["x-phoenix-backend"] == "ollama-2"
        assert [item["index"] for item in answer.json()["data"]] == [0, 1]
    errors = sample(samples, "gateway_upstream_errors_total", backend="ollama-1", reason="protocol")
    assert errors >= 1
    assert sample(samples, "gateway_retries_total", backend="ollama-1") == errors  # moved away from it


def test_embeddings_have_the_dimensions_asked_for_when_ollama_ignores_them(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    fake, _ = fake_ollama  # like Ollama 0.5.4, the fake answers full-length (4) vectors whatever `dimensions`
    full = fake.vector("alpha")[:2]
    norm = sum(value * value for value in full) ** 0.5
    expected = [value / norm for value in full]
    floats = client(gateway).embeddings.create(
        model="embed", input="alpha", dimensions=2, encoding_format="float"
    )
    assert floats.data[0].embedding == pytest.approx(expected)
    raw = httpx.post(
        gateway.url + "/v1/embeddings",
        json={"model": "embed", "input": "alpha", "dimensions": 2, "encoding_format": "base64"},
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(expected, rel=1e-6)
    assert [body["dimensions"] for path, body in fake.requests if path == "/api/embed"] == [2, 2]
    too_many = httpx.post(
        gateway.url + "/v1/embeddings", json={"model": "embed", "input": "alpha", "dimensions": 8}
    )
    assert too_many.status_code == 400
    error = error_of(too_many)
    assert error["param"] == "dimensions"
    assert "Ollama server at" in str(error["message"])
    assert "4-dimensional" in str(error["message"])


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ([], "must not be an empty array"),
        ("", "must not be an empty string"),
        (["alpha", ""], "item [1] is empty"),
        ([[1, 2], []], "item [1] is empty"),
        (["x"] * (MAX_EMBEDDING_INPUTS + 1), f"at most {MAX_EMBEDDING_INPUTS} inputs"),
        (7, "valid string"),
    ],
    ids=["empty-array", "empty-string", "empty-item", "empty-token-array", "too-many", "number"],
)
def test_embeddings_input_is_checked_before_any_backend(
    fake_ollama: FakeServer, gateway: ServerThread, given: object, fragment: str
) -> None:
    fake, _ = fake_ollama
    response = httpx.post(gateway.url + "/v1/embeddings", json={"model": "embed", "input": given})
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", "input")
    assert fragment in str(error["message"])
    assert [path for path, _ in fake.requests if path == "/api/embed"] == []


def test_models_lists_configured_names_and_ollama_tags(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    ids = {m.id for m in client(gateway).models.list()}
    assert {"llama3.2", "default", "embed"} <= ids
    assert {"ollama/llama3.2:latest", "ollama/qwen2.5:0.5b"} <= ids
    one = client(gateway).models.retrieve("ollama/qwen2.5:0.5b")
    assert (one.id, one.object, one.owned_by) == ("ollama/qwen2.5:0.5b", "model", "library")
    missing = httpx.get(gateway.url + "/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_prefix_route_passes_the_upstream_name(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    fake, _ = fake_ollama
    client(gateway).chat.completions.create(
        model="ollama/qwen2.5:0.5b", messages=[{"role": "user", "content": "x"}]
    )
    assert fake.chat_bodies()[-1]["model"] == "qwen2.5:0.5b"


def test_health_and_readiness(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    wait_for(lambda: httpx.get(gateway.url + "/readyz").status_code == 200)  # the first probe, at start
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["backends"]["ollama-1"] == {"type": "ollama", "local": True, "up": True}


# ---- errors ----


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, object] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return error


def post(gateway: ServerThread, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers)


def test_ollama_down_is_503_naming_the_url(start_gateway: Callable[[Config], ServerThread]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = start_gateway(ollama_config(dead))
    with pytest.raises(openai.InternalServerError) as caught:
        client(gateway).chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 503
    assert f"Cannot connect to Ollama server at {dead}" in caught.value.message
    streamed = post(
        gateway, {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    assert streamed.status_code == 503
    assert error_of(streamed)["type"] == "server_error"
    assert httpx.get(gateway.url + "/readyz").status_code == 503


def test_not_ready_while_no_backend_answers_its_probe(
    start_gateway: Callable[[Config], ServerThread],
) -> None:
    port = free_port()
    config = ollama_config(
        f"http://127.0.0.1:{port}",
        backends=[
            {"name": "ollama-1", "type": "ollama", "base_url": f"http://127.0.0.1:{port}"},
            {"name": "ollama-2", "type": "ollama", "base_url": f"http://127.0.0.1:{free_port()}"},
        ],
        routing={"health": {"interval": 0.2, "unhealthy_after": 1000}},  # never ejected
    )
    gateway = start_gateway(config)
    wait_for(lambda: httpx.get(gateway.url + "/readyz").status_code == 503)
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "unavailable",
        "backends": {
            name: {"type": "ollama", "local": True, "up": False} for name in ("ollama-1", "ollama-2")
        },
    }

    with serve(FakeOllama().app, port=port):  # ollama-1 comes up: the next probe finds it
        wait_for(lambda: httpx.get(gateway.url + "/readyz").status_code == 200)
        ready = httpx.get(gateway.url + "/readyz")
        assert ready.status_code == 200
        assert {name: entry["up"] for name, entry in ready.json()["backends"].items()} == {
            "ollama-1": True,
            "ollama-2": False,
        }


def test_model_missing_on_ollama_says_to_pull_it(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(gateway).chat.completions.create(
            model="ollama/mistral:7b", messages=[{"role": "user", "content": "x"}]
        )
    assert "run `ollama pull mistral:7b`" in caught.value.message
    assert caught.value.code == "model_not_found"


def test_unknown_model_is_404_with_close_names(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    response = post(gateway, {"model": "llama3", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "llama3.2" in str(error["message"])


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"model": "llama3.2"}, "messages", "Missing required parameter: 'messages'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "Missing required parameter: 'model'"),
        ({"model": "llama3.2", "messages": []}, "messages", "at least 1 item"),
        ({"model": "llama3.2", "messages": "hi"}, "messages", "valid list"),
        (
            {"model": "llama3.2", "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
            "'system'",
        ),
        ({"model": "llama3.2", "messages": [{"role": "user"}]}, "messages[0]", "needs 'content'"),
        (
            {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
            "number",
        ),
        (
            {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "temperature",
            "2",
        ),
        ({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "one choice"),
        # strict, as OpenAI is: a string is not a boolean or an integer
        (
            {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "stream",
            "boolean",
        ),
        (
            {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
            "max_tokens",
            "integer",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    fake_ollama: FakeServer, gateway: ServerThread, body: dict[str, object], param: str, fragment: str
) -> None:
    response = post(gateway, body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in str(error["message"])


def test_malformed_json_is_400(gateway: ServerThread) -> None:
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in str(error_of(response)["message"])


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nothing"), ("POST", "/v1/chat/completions/"), ("POST", "/v1/embeddings/")],
)
def test_unknown_endpoint_is_an_openai_shaped_404(gateway: ServerThread, method: str, path: str) -> None:
    # A trailing slash too: no redirect, which an SDK would not follow for a POST anyway.
    response = httpx.request(method, gateway.url + path, json={})
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "words"),
    [
        ("POST", "/chat/completions", "Did you mean POST /v1/chat/completions? The client's base_url"),
        ("POST", "/v1/v1/embeddings", "Did you mean POST /v1/embeddings? The client's base_url"),
        ("GET", "/models/llama3.2", "Did you mean GET /v1/models/llama3.2?"),
        (
            "POST",
            "/v1/chat/completions/",
            "Did you mean POST /v1/chat/completions, without the trailing slash?",
        ),
        (
            "POST",
            "/v1/responses",
            "This gateway serves POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings",
        ),
        ("GET", "/chat/completions", "This gateway serves POST /v1/chat/completions"),
    ],
)
def test_a_404_says_which_url_was_meant_or_what_is_served(
    gateway: ServerThread, method: str, path: str, words: str
) -> None:
    response = httpx.request(method, gateway.url + path, json={})
    assert response.status_code == 404
    assert words in str(error_of(response)["message"])


def test_an_sdk_whose_base_url_lacks_v1_is_told_so(gateway: ServerThread) -> None:
    sdk = openai.OpenAI(base_url=gateway.url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert "Did you mean POST /v1/chat/completions?" in caught.value.message


def test_mid_stream_error_becomes_an_sse_error_event(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    fake, _ = fake_ollama
    fake.queue(Reply(pieces=["a", "b", "c"], error_after=2))
    with pytest.raises(openai.APIError) as caught:
        list(
            client(gateway).chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    assert "mid-stream" in caught.value.message


def test_stream_without_done_ends_with_a_defined_error(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    fake, _ = fake_ollama
    fake.queue(Reply(pieces=["two", "two"], omit_done=True))
    with pytest.raises(openai.APIError) as caught:
        list(
            client(gateway).chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    assert "without its final 'done' line" in caught.value.message


@pytest.mark.parametrize(
    ("extra", "stream", "param", "words"),
    [
        ({"options": {"stop": "x"}}, False, "options.stop", 'option "stop" must be of type array'),
        (
            {"options": {"num_ctx": "big"}},
            True,
            "options.num_ctx",
            'option "num_ctx" must be of type integer',
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": UNUSABLE}}},
            False,
            "response_format",
            "invalid JSON schema in format",
        ),
    ],
)
def test_what_ollama_refuses_with_a_500_is_the_clients_400_and_no_fault_of_the_instance(
    start_gateway: Callable[[Config], ServerThread],
    extra: dict[str, Any],
    stream: bool,
    param: str,
    words: str,
) -> None:
    # Real Ollama (0.5.4 and newer) answers a wrongly typed option, or a schema it cannot make a
    # grammar of, with 500. Taken for its own fault, it was a 502, tried on the other instance, and
    # three such requests ejected both: /readyz said 503 for a client's typo.
    fakes = [FakeOllama(models=["llama3.2:latest"]) for _ in range(2)]
    with serve(fakes[0].app) as first, serve(fakes[1].app) as second:
        backends = [
            {"name": f"ollama-{i}", "type": "ollama", "base_url": server.url}
            for i, server in enumerate((first, second))
        ]
        deployments = [{"backend": backend["name"], "model": "llama3.2:latest"} for backend in backends]
        gateway = start_gateway(
            ollama_config(
                first.url, backends=backends, models=[{"name": "llama3.2", "deployments": deployments}]
            )
        )
        body = {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "x"}],
            "stream": stream,
            **extra,
        }
        for _ in range(4):
            response = post(gateway, body)
            assert response.status_code == 400
            error = error_of(response)
            assert (error["type"], error["param"]) == ("invalid_request_error", param)
            assert error["message"] == f"Ollama rejected the request: {words}"
        assert sum(len(fake.chat_bodies()) for fake in fakes) == 4  # never tried again elsewhere
        samples = scrape(gateway.url)
        assert [sample(samples, "gateway_backend_up", backend=f"ollama-{i}") for i in range(2)] == [1.0, 1.0]
        assert sample(samples, "gateway_retries_total", backend="ollama-0") == 0
        assert sample(samples, "gateway_retries_total", backend="ollama-1") == 0


@pytest.mark.parametrize("keep_alive", ["bogus", "5", True])
def test_a_keep_alive_ollama_cannot_read_is_a_400_naming_it(
    fake_ollama: FakeServer, gateway: ServerThread, keep_alive: object
) -> None:
    response = post(gateway, {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}],
                              "keep_alive": keep_alive})  # fmt: skip
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", "keep_alive")
    assert str(error["message"]).startswith(
        ("Ollama rejected the request: time: ", "Ollama rejected the request: Unsupported type")
    )


def test_a_first_stream_line_that_says_the_schema_is_unusable_is_a_400(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    # Ollama 0.5.4 writes it as a stream's only line, after a 200 (newer ones answer 500 first).
    fake, _ = fake_ollama
    fake.queue(Reply(pieces=["never"], error_after=0, error_text="invalid JSON schema in format"))
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}
    response = post(gateway, {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}],
                              "stream": True, "response_format": schema})  # fmt: skip
    assert response.status_code == 400
    assert error_of(response)["param"] == "response_format"
    assert len(fake.chat_bodies()) == 1
    assert sample(scrape(gateway.url), "gateway_backend_up", backend="ollama-1") == 1.0


def test_request_id_is_honoured_or_generated(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}
    assert post(gateway, body, headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = post(gateway, body).headers["x-request-id"]
    assert len(generated) == 32


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        (
            "POST",
            "/v1/chat/completions",
            {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": True},
            200,
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
        ),
        ("POST", "/v1/embeddings", {"model": "embed"}, 400),
        ("GET", "/v1/chat/completions", None, 405),
        ("GET", "/v1/models", None, 200),
        ("GET", "/healthz", None, 200),
    ],
    ids=["stream", "error", "embeddings-error", "method-not-allowed", "models", "health"],
)
def test_every_answer_carries_the_request_id_once(
    *, fake_ollama: FakeServer, gateway: ServerThread, method: str, path: str, body: object, status: int
) -> None:
    answer = httpx.request(
        method, gateway.url + path, json=body, headers={"x-request-id": "id-7"}, timeout=10
    )
    assert answer.status_code == status
    assert answer.headers.get_list("x-request-id") == ["id-7"]


# ---- metrics and disconnects ----


def test_metrics_count_requests_tokens_and_ttft(fake_ollama: FakeServer, gateway: ServerThread) -> None:
    fake, _ = fake_ollama
    fake.queue(
        Reply(content="x", prompt_eval_count=10, eval_count=3),
        Reply(pieces=["a", "b"], prompt_eval_count=5, eval_count=2),
        Reply(status=500, error_text="boom"),
    )
    api = client(gateway)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x"}]
    api.chat.completions.create(model="llama3.2", messages=messages)
    list(api.chat.completions.create(model="llama3.2", messages=messages, stream=True))
    with pytest.raises(openai.InternalServerError):
        api.chat.completions.create(model="llama3.2", messages=messages)
    post(gateway, {"model": "made-up-model", "messages": messages})
    samples = scrape(gateway.url)
    labels = {"endpoint": "chat", "model": "llama3.2", "backend": "ollama-1"}
    assert sample(samples, "gateway_requests_total", **labels, status="200") == 2
    assert sample(samples, "gateway_requests_total", **labels, status="502") == 1
    assert sample(samples, "gateway_requests_total", endpoint="chat", model="", backend="", status="404") == 1
    assert sample(samples, "gateway_tokens_total", model="llama3.2", backend="ollama-1", type="prompt") == 15
    assert (
        sample(samples, "gateway_tokens_total", model="llama3.2", backend="ollama-1", type="completion") == 5
    )
    assert (
        sample(samples, "gateway_time_to_first_token_seconds_count", model="llama3.2", backend="ollama-1")
        == 1
    )
    assert (
        sample(samples, "gateway_time_per_output_token_seconds_count", model="llama3.2", backend="ollama-1")
        == 1
    )
    assert sample(samples, "gateway_overhead_seconds_count", endpoint="chat") == 4
    assert sample(samples, "gateway_request_duration_seconds_count", **labels, stream="true") == 1
    assert sample(samples, "gateway_upstream_errors_total", backend="ollama-1", reason="status") == 1
    assert sample(samples, "gateway_inflight_requests", backend="ollama-1") == 0
    assert not any(dict(key[1]).get("model") == "made-up-model" for key in samples)


def test_client_disconnect_mid_stream_cancels_the_upstream(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    fake, _ = fake_ollama
    fake.queue(Reply(pieces=["tok "] * 200, delay_between=0.05))
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    wait_for(lambda: fake.cancelled >= 1)
    assert fake.cancelled == 1

    def cancelled_requests() -> float:
        labels = {"endpoint": "chat", "model": "llama3.2", "backend": "ollama-1", "status": "499"}
        return sample(scrape(gateway.url), "gateway_requests_total", **labels)

    wait_for(lambda: cancelled_requests() >= 1)
    assert cancelled_requests() == 1
    samples = scrape(gateway.url)
    assert sample(samples, "gateway_inflight_requests", backend="ollama-1") == 0


def test_a_client_that_stops_reading_is_dropped_without_a_server_error(
    fake_ollama: FakeServer, gateway: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection is open and nothing is read: the stream is cut, the connection dropped
    # rather than left waiting to send, and uvicorn logs no "returned without completing".
    monkeypatch.setattr(relay_module, "CLIENT_STALL_SECONDS", 0.5)
    errors: list[str] = []

    class Errors(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())

    handler = Errors(logging.ERROR)
    logging.getLogger("uvicorn.error").addHandler(handler)
    fake, _ = fake_ollama
    fake.queue(Reply(pieces=["x" * 8192] * 8000))  # 64 MB: more than the socket buffers hold
    body = orjson.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": True})
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ncontent-type: application/json\r\n"
    head += b"content-length: %d\r\n\r\n" % len(body)
    host, port = gateway.url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        client.connect((host, int(port)))
        client.sendall(head + body)

        def cut() -> float:
            labels = {"endpoint": "chat", "model": "llama3.2", "backend": "ollama-1", "status": "499"}
            return sample(scrape(gateway.url), "gateway_requests_total", **labels)

        wait_for(cut)
        assert cut() == 1
        client.settimeout(5)
        received = b""
        with contextlib.suppress(ConnectionResetError):  # the connection ends: EOF or a reset
            while chunk := client.recv(1 << 20):
                received += chunk
    finally:
        client.close()
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert received.startswith(b"HTTP/1.1 200")
    assert b"[DONE]" not in received and len(received) < 8 << 20
    assert sample(scrape(gateway.url), "gateway_inflight_requests", backend="ollama-1") == 0
    assert errors == []


def leave_early(gateway: ServerThread, path: str, body: dict[str, Any], *, after: float) -> None:
    """Send `body` and leave after `after` seconds without an answer. The request must then be
    recorded as a 499 at once (within wait_for's 5 s, well before the backend's 10 s answer),
    with nothing left in flight."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + path, json=body, timeout=httpx.Timeout(5, read=after))
    endpoint = path.removeprefix("/v1/").removesuffix("/completions")
    labels = {"endpoint": endpoint, "model": body["model"], "backend": "ollama-1", "status": "499"}

    def gone() -> float:
        return sample(scrape(gateway.url), "gateway_requests_total", **labels)

    wait_for(gone)
    assert gone() == 1
    assert sample(scrape(gateway.url), "gateway_inflight_requests", backend="ollama-1") == 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_client_that_leaves_before_its_answer_stops_the_request_at_once(
    fake_ollama: FakeServer, gateway: ServerThread, stream: bool
) -> None:
    # A cold model load can take minutes; a client that gives up meanwhile frees the backend then.
    # A stream is watched from before it opens; a JSON request by the sweeper once it is a second old.
    fake, _ = fake_ollama
    fake.queue(Reply(pieces=["late "], delay_first=10))
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    leave_early(gateway, "/v1/chat/completions", body, after=0.3 if stream else 2.5)
    assert len(fake.chat_bodies()) == 1  # and nothing was retried for a client that is gone


def test_a_client_that_leaves_a_long_embeddings_request_stops_it(
    fake_ollama: FakeServer, gateway: ServerThread
) -> None:
    fake, _ = fake_ollama
    fake.embed_delay = 10
    leave_early(gateway, "/v1/embeddings", {"model": "embed", "input": "x"}, after=2.5)
    assert len([path for path, _ in fake.requests if path == "/api/embed"]) == 1


def raw_post(gateway: ServerThread, head_extra: bytes = b"") -> tuple[socket.socket, bytes]:
    host, port = gateway.url.removeprefix("http://").split(":")
    body = orjson.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]})
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ncontent-type: application/json\r\n"
    head += b"content-length: %d\r\n" % len(body) + head_extra + b"\r\n"
    client = socket.create_connection((host, int(port)), timeout=10)
    client.sendall(head)
    return client, body


def read_to_close(client: socket.socket) -> bytes:
    answer = b""
    while chunk := client.recv(65536):
        answer += chunk
    return answer


def test_a_body_that_stops_coming_is_408_and_closes_the_connection(
    start_gateway: Callable[[Config], ServerThread], fake_ollama: FakeServer
) -> None:
    gateway = start_gateway(ollama_config(fake_ollama[1].url, server={"body_timeout": 1}))
    client, body = raw_post(gateway)
    with client:
        client.sendall(body[:10])  # and nothing more
        answer = read_to_close(client)  # the gateway closes it: the rest of the body never came
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"connection: close" in head.lower()
    error = orjson.loads(payload)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
    assert "nothing for 1 seconds" in error["message"]
    assert fake_ollama[0].chat_bodies() == []
    labels = {"endpoint": "chat", "model": "", "backend": "", "status": "408"}
    assert sample(scrape(gateway.url), "gateway_requests_total", **labels) == 1


def test_a_slow_body_that_keeps_coming_is_served(
    start_gateway: Callable[[Config], ServerThread], fake_ollama: FakeServer
) -> None:
    # The timeout is for a body that stops, not for a slow one: each byte that comes restarts it.
    gateway = start_gateway(ollama_config(fake_ollama[1].url, server={"body_timeout": 1}))
    client, body = raw_post(gateway, b"connection: close\r\n")
    with client:
        pieces = [body[i : i + len(body) // 8 + 1] for i in range(0, len(body), len(body) // 8 + 1)]
        for piece in pieces:  # over about 3.5 s, three and a half times the timeout
            client.sendall(piece)
            time.sleep(0.45)
        answer = read_to_close(client)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert len(fake_ollama[0].chat_bodies()) == 1


def test_oversized_body_is_413(
    start_gateway: Callable[[Config], ServerThread], fake_ollama: FakeServer
) -> None:
    gateway = start_gateway(ollama_config(fake_ollama[1].url, server={"max_body_bytes": 2048}))
    big = {"model": "llama3.2", "messages": [{"role": "user", "content": "x" * 4096}]}
    response = post(gateway, big)
    assert response.status_code == 413
    assert "2048 bytes" in str(error_of(response)["message"])
    assert fake_ollama[0].chat_bodies() == []


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
def test_a_body_refused_before_it_is_read_closes_its_connection(
    start_gateway: Callable[[Config], ServerThread], fake_ollama: FakeServer, expect: bool
) -> None:
    # Not reading through 300 MB for nothing, nor taking the rest of it for the next request.
    gateway = start_gateway(ollama_config(fake_ollama[1].url, server={"max_body_bytes": 2048}))
    host, port = gateway.url.removeprefix("http://").split(":")
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ncontent-type: application/json\r\n"
    head += b"content-length: 300000000\r\n" + (b"expect: 100-continue\r\n" if expect else b"") + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=5) as client:
        client.sendall(head + (b"" if expect else b'{"model": "llama3.2", "messages": ['))
        answer = b""
        while chunk := client.recv(65536):  # until the gateway closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert b"connection: close" in answer.lower()
    assert b"100 Continue" not in answer
    assert fake_ollama[0].chat_bodies() == []


@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_a_compressed_body_is_415_naming_the_encoding(gateway: ServerThread, encoding: str) -> None:
    body = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}).encode()
    headers = {"content-type": "application/json", "content-encoding": encoding}
    response = httpx.post(gateway.url + "/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 415  # not read as if it were plain (br) nor called bad UTF-8 (gzip)
    assert f"'{encoding}'" in str(error_of(response)["message"])


def test_wrong_content_type_is_400(gateway: ServerThread) -> None:
    response = httpx.post(
        gateway.url + "/v1/chat/completions", content=b"model=x", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 400
    assert "application/json" in str(error_of(response)["message"])
