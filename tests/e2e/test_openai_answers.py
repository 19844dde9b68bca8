"""What an OpenAI-compatible backend answers beyond text reaches the client through the official
SDK: a refusal, log probabilities, URL citations, the usage breakdown, and an id for a tool call
the backend sent without one (OpenAI's schema requires it; the client sends it back)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionCustomToolParam
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.config import Config, parse_config
from tests.servers import ServerThread, serve

pytestmark = pytest.mark.e2e

TOKENS = [
    {
        "token": "No",
        "logprob": -0.25,
        "bytes": [78, 111],
        "top_logprobs": [{"token": "No", "logprob": -0.25}],
    },
    {"token": ".", "logprob": -0.5, "bytes": [46], "top_logprobs": [{"token": ".", "logprob": -0.5}]},
]
USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 9,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 16},
    "completion_tokens_details": {"reasoning_tokens": 4},
}
CITATION = {
    "type": "url_citation",
    "url_citation": {"start_index": 0, "end_index": 2, "url": "https://example.org/", "title": "Example"},
}


# Gemini's OpenAI endpoint: a thought signature Gemini 3 wants back with the call on the next turn
SIGNED_CALL = {
    "id": "call_s1",
    "type": "function",
    "function": {"name": "lookup", "arguments": '{"q":"x"}'},
    "extra_content": {"google": {"thought_signature": "CtMBAbc=="}},
}


def answer(scenario: str) -> dict[str, Any]:
    """A whole answer, as OpenAI's API sends one."""
    if scenario == "refusal":
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    elif scenario == "custom_tool":
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_c1", "type": "custom", "custom": {"name": "grep", "input": "foo.*bar"}}
            ],
        }
    elif scenario == "extra_content":
        message = {"role": "assistant", "content": None, "tool_calls": [SIGNED_CALL]}
    elif scenario == "tool_call_without_id":  # as some OpenAI-compatible servers send them
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": '{"q":"x"}'}}],
        }
    else:
        message = {"role": "assistant", "content": "No.", "refusal": None, "annotations": [CITATION]}
    return {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": 1767225600,
        "model": "gpt-test",
        "system_fingerprint": "fp_upstream",
        "choices": [
            {"index": 0, "message": message, "logprobs": {"content": TOKENS}, "finish_reason": "stop"}
        ],
        "usage": USAGE,
    }


WEATHER = {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
TIME = {"name": "get_time", "arguments": '{"tz":"UTC"}'}


def events(scenario: str) -> list[dict[str, Any]]:
    """The same answers as a stream."""
    head = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": "m",
        "service_tier": "default",
        "system_fingerprint": "fp_upstream",
    }

    def choice(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {
            **head,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    if scenario == "refusal":
        middle = [choice({"refusal": "I can't "}), choice({"refusal": "help with that."})]
    elif scenario == "custom_tool":
        middle = [
            choice(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_c1",
                            "type": "custom",
                            "custom": {"name": "grep", "input": "foo"},
                        }
                    ]
                }
            ),
            choice({"tool_calls": [{"index": 0, "custom": {"input": ".*bar"}}]}),
        ]
    elif scenario == "tool_call_without_id":
        middle = [
            choice({"tool_calls": [{"index": 0, "function": {"name": "lookup", "arguments": '{"q":'}}]}),
            choice({"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}),
        ]
    elif scenario == "extra_content":
        middle = [choice({"tool_calls": [{"index": 0, **SIGNED_CALL}]})]
    elif scenario == "calls_without_index":  # as Gemini's OpenAI endpoint sends them: each whole
        middle = [
            choice({"tool_calls": [{"id": "call_a", "type": "function", "function": WEATHER}]}),
            choice({"tool_calls": [{"id": "call_b", "type": "function", "function": TIME}]}),
        ]
    elif scenario == "calls_from_index_1":  # a server that counted a text block first
        middle = [
            choice({"tool_calls": [{"index": 1, "id": "call_a", "function": {**WEATHER, "arguments": ""}}]}),
            choice({"tool_calls": [{"index": 1, "function": {"arguments": WEATHER["arguments"]}}]}),
            choice({"tool_calls": [{"index": 2, "id": "call_b", "function": TIME}]}),
        ]
    else:
        middle = [choice({"content": token["token"]}, logprobs={"content": [token]}) for token in TOKENS]
    return [
        choice({"role": "assistant", "content": ""}),
        *middle,
        choice({}, "stop"),
        {**head, "choices": [], "usage": USAGE},
    ]


RECEIVED: list[dict[str, Any]] = []


async def chat(request: Request) -> Response:
    body = orjson.loads(await request.body())
    RECEIVED.append(body)
    scenario = body["messages"][-1]["content"]
    if not body.get("stream"):
        return Response(orjson.dumps(answer(scenario)), media_type="application/json")
    stream = b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events(scenario))
    return Response(stream + b"data: [DONE]\n\n", media_type="text/event-stream")


@pytest.fixture(scope="module")
def backend() -> Iterator[ServerThread]:
    with serve(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])) as server:
        yield server


@pytest.fixture
def api(backend: ServerThread, start_gateway: Callable[[Config], ServerThread]) -> openai.OpenAI:
    config = parse_config(
        {
            "backends": [{"name": "b", "type": "openai", "base_url": backend.url + "/v1", "local": True}],
            "models": [{"name": "chat", "deployments": [{"backend": "b", "model": "gpt-test"}]}],
        },
        "test",
    )
    gateway = start_gateway(config)
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def ask(api: openai.OpenAI, scenario: str) -> Any:
    return api.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": scenario}], logprobs=True, top_logprobs=1
    )


def test_a_refusal_reaches_the_client_whole_and_streamed(api: openai.OpenAI) -> None:
    assert ask(api, "refusal").choices[0].message.refusal == "I can't help with that."
    with api.chat.completions.stream(
        model="chat", messages=[{"role": "user", "content": "refusal"}]
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.refusal == "I can't help with that."


def test_log_probabilities_citations_usage_details_and_fingerprint_are_passed_on(api: openai.OpenAI) -> None:
    completion = ask(api, "text")
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert [(t.token, t.logprob, t.bytes) for t in choice.logprobs.content] == [
        ("No", -0.25, [78, 111]),
        (".", -0.5, [46]),
    ]
    assert choice.message.annotations is not None
    assert choice.message.annotations[0].url_citation.url == "https://example.org/"
    assert completion.system_fingerprint == "fp_upstream"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 16
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 4

    chunks = list(
        api.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "text"}],
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = [
        t.token
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    assert streamed == ["No", "."]
    assert {(c.system_fingerprint, c.service_tier) for c in chunks} == {("fp_upstream", "default")}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens_details is not None
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 4


def test_a_tool_call_the_backend_sent_without_an_id_gets_one(api: openai.OpenAI) -> None:
    [call] = ask(api, "tool_call_without_id").choices[0].message.tool_calls or []
    assert call.id.startswith("call_") and len(call.id) > len("call_")
    assert (call.function.name, call.function.arguments) == ("lookup", '{"q":"x"}')

    messages: Any = [{"role": "user", "content": "tool_call_without_id"}]
    with api.chat.completions.stream(model="chat", messages=messages) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert call.id.startswith("call_") and len(call.id) > len("call_")
    assert (call.type, call.function.name, call.function.arguments) == ("function", "lookup", '{"q":"x"}')


@pytest.mark.parametrize("scenario", ["calls_without_index", "calls_from_index_1"])
def test_streamed_calls_reach_the_sdk_numbered_from_0_whatever_the_backend_numbered_them(
    api: openai.OpenAI, scenario: str
) -> None:
    messages: Any = [{"role": "user", "content": scenario}]
    with api.chat.completions.stream(model="chat", messages=messages) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a", "get_weather", '{"city":"Oslo"}'),
        ("call_b", "get_time", '{"tz":"UTC"}'),
    ]


def test_fields_a_backend_adds_to_a_tool_call_reach_the_client_and_go_back_with_the_call(
    api: openai.OpenAI,
) -> None:
    messages: Any = [{"role": "user", "content": "extra_content"}]
    [whole] = api.chat.completions.create(model="chat", messages=messages).choices[0].message.tool_calls or []
    with api.chat.completions.stream(model="chat", messages=messages) as stream:
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls or []
    for call in (whole, streamed):
        assert call.model_dump(exclude_none=True, exclude={"parsed_arguments", "index"}) == SIGNED_CALL

    history: Any = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [whole.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": "call_s1", "content": "found"},
    ]
    api.chat.completions.create(model="chat", messages=history)
    assert RECEIVED[-1]["messages"][1]["tool_calls"] == [SIGNED_CALL]


def test_a_history_call_without_type_or_arguments_goes_upstream_as_openai_requires_it(
    api: openai.OpenAI,
) -> None:
    call = {"id": "call_t1", "function": {"name": "lookup"}}  # the gateway accepts it, as others serve it
    history: Any = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_t1", "content": "found"},
        {"role": "user", "content": "text"},
    ]
    assert api.chat.completions.create(model="chat", messages=history).choices[0].message.content == "No."
    assert RECEIVED[-1]["messages"][1]["tool_calls"] == [
        {"id": "call_t1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    ]


CUSTOM_TOOL: ChatCompletionCustomToolParam = {
    "type": "custom",
    "custom": {"name": "grep", "description": "a pattern", "format": {"type": "text"}},
}


def test_a_custom_tool_goes_to_an_openai_backend_and_its_call_comes_back(api: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "custom_tool"}]
    completion = api.chat.completions.create(model="chat", messages=messages, tools=[CUSTOM_TOOL])
    assert RECEIVED[-1]["tools"] == [CUSTOM_TOOL]
    [call] = completion.choices[0].message.tool_calls or []
    assert call.type == "custom"
    assert (call.id, call.custom.name, call.custom.input) == ("call_c1", "grep", "foo.*bar")

    # streamed (the SDK's chunk types know only function calls: read the events as they come)
    url = str(api.base_url) + "chat/completions"
    body = {"model": "chat", "messages": messages, "tools": [CUSTOM_TOOL], "stream": True}
    events = [
        orjson.loads(line.removeprefix("data: "))
        for line in httpx.post(url, json=body, timeout=10).text.splitlines()
        if line.startswith("data: {")
    ]
    deltas = [c for e in events for choice in e["choices"] for c in choice["delta"].get("tool_calls") or ()]
    assert deltas == [
        {"index": 0, "id": "call_c1", "type": "custom", "custom": {"name": "grep", "input": "foo"}},
        {"index": 0, "custom": {"input": ".*bar"}},
    ]

    # the call in the history, with its result, goes back as it came
    history: Any = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": "call_c1", "content": "3 matches"},
        {"role": "user", "content": "text"},
    ]
    api.chat.completions.create(model="chat", messages=history, tools=[CUSTOM_TOOL])
    assert RECEIVED[-1]["messages"][1]["tool_calls"] == [
        {"id": "call_c1", "type": "custom", "custom": {"name": "grep", "input": "foo.*bar"}}
    ]
