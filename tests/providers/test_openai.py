"""The OpenAI-compatible adapter: pass-through requests, parsed answers, streamed fragments, errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import InvalidRequest, ModelNotFound, UpstreamProtocol, UpstreamRejected
from gateway.providers import openai
from gateway.schemas import ChatRequest


def request(**fields: Any) -> ChatRequest:
    fields.setdefault("model", "client-name")
    fields.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return ChatRequest.model_validate(fields)


def test_request_passes_through_with_model_rewritten_and_unknown_fields_kept() -> None:
    body = openai.build_request(
        request(temperature=0.3, logit_bias={"50256": -100}, service_tier="flex"), "gpt-4o", stream=False
    )
    assert body["model"] == "gpt-4o"
    assert body["temperature"] == 0.3
    assert body["logit_bias"] == {"50256": -100}
    assert body["service_tier"] == "flex"
    assert body["stream"] is False
    assert "stream_options" not in body


def test_fields_the_client_did_not_send_are_not_invented() -> None:
    body = openai.build_request(request(), "m", stream=False)
    assert set(body) == {"model", "messages", "stream"}
    assert body["messages"] == [{"role": "user", "content": "Hi"}]


def test_history_tool_calls_go_upstream_with_the_fields_openai_requires() -> None:
    calls = [
        {"id": "c1", "function": {"name": "f"}},  # accepted: `function` when the type is left out
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": ""}},
        {"id": "c3", "type": "custom", "custom": {"name": "grep", "input": "x"}},
    ]
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": calls}]
    sent = openai.build_request(request(messages=history), "m", stream=False)["messages"][1]["tool_calls"]
    assert sent == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": ""}},  # as sent
        {"id": "c3", "type": "custom", "custom": {"name": "grep", "input": "x"}},
    ]


def test_max_tokens_is_forwarded_exactly_as_sent() -> None:
    assert "max_completion_tokens" not in openai.build_request(request(max_tokens=5), "m", stream=False)
    body = openai.build_request(request(max_completion_tokens=7), "m", stream=False)
    assert body["max_completion_tokens"] == 7 and "max_tokens" not in body


def test_streams_always_ask_for_usage_and_keep_other_stream_options() -> None:
    body = openai.build_request(request(stream_options={"include_obfuscation": False}), "m", stream=True)
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}


@pytest.mark.parametrize(
    ("fields", "sent"),
    [
        ({"metadata": {"privacy": "private"}}, None),
        ({"metadata": {"privacy": "public", "team": "radiology"}}, None),  # OpenAI refuses it without store
        ({"metadata": {"privacy": "public", "team": "radiology"}, "store": True}, {"team": "radiology"}),
        ({"metadata": {"privacy": "public"}, "store": True}, None),
        ({"metadata": {"team": "radiology"}, "store": False}, None),
    ],
)
def test_metadata_goes_upstream_with_store_and_without_the_gateway_s_privacy_key(
    fields: dict[str, Any], sent: dict[str, str] | None
) -> None:
    assert openai.build_request(request(**fields), "m", stream=False).get("metadata") == sent


def test_response_with_tool_calls_and_null_content() -> None:
    body = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_a1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"x":1}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 61, "completion_tokens": 17, "total_tokens": 78},
    }
    completion = openai.parse_response(body)
    choice = completion.choices[0]
    assert choice.content is None
    assert (choice.tool_calls[0].id, choice.tool_calls[0].name, choice.tool_calls[0].arguments) == (
        "call_a1",
        "f",
        '{"x":1}',
    )
    assert choice.finish_reason == "tool_calls"
    assert completion.usage.total_tokens == 78


@pytest.mark.parametrize(
    ("upstream", "tool_calls", "expected"),
    [
        ("stop", False, "stop"),
        ("length", False, "length"),
        ("content_filter", False, "content_filter"),
        ("function_call", False, "tool_calls"),
        ("stop", True, "tool_calls"),  # a backend that says stop after emitting calls
        ("eos_token", False, "stop"),  # never pass a backend's own reason through
        (None, False, "stop"),
    ],
)
def test_finish_reasons_stay_in_the_openai_set(upstream: str | None, tool_calls: bool, expected: str) -> None:
    assert openai.finish_reason(upstream, tool_calls) == expected


def test_missing_usage_is_zero_and_n_choices_keep_their_index() -> None:
    body = {"choices": [{"index": 1, "message": {"content": "b"}}, {"index": 0, "message": {"content": "a"}}]}
    completion = openai.parse_response(body)
    assert [(c.index, c.content) for c in completion.choices] == [(1, "b"), (0, "a")]
    assert completion.usage.as_dict() == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_a_body_without_choices_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocol):
        openai.parse_response({"object": "error"})


def event(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> str:
    return orjson.dumps({"choices": [{"index": index, "delta": delta, "finish_reason": finish}]}).decode()


def test_stream_fragments_keep_id_and_name_on_the_first_only() -> None:
    state = openai.StreamState()
    chunks = [
        *state.parse_chunk(event({"role": "assistant", "content": ""})),
        *state.parse_chunk(
            event(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "f", "arguments": ""},
                        }
                    ]
                }
            )
        ),
        *state.parse_chunk(event({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]})),
        *state.parse_chunk(event({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})),
        *state.parse_chunk(event({}, "stop")),
    ]
    calls = [call for chunk in chunks for call in chunk.tool_calls]
    assert [(c.id, c.name) for c in calls] == [("call_a", "f"), (None, None), (None, None)]
    assert "".join(c.arguments for c in calls) == '{"x":1}'
    assert chunks[-1].finish_reason == "tool_calls"


def call(name: str | None = None, arguments: str = "", **fields: Any) -> dict[str, Any]:
    function = {"arguments": arguments} if name is None else {"name": name, "arguments": arguments}
    return {**fields, "function": function}


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        pytest.param(  # Gemini's OpenAI endpoint: each call whole, no index
            [[call("f", "{}", id="a")], [call("g", "{}", id="b")]],
            [(0, "a", "f"), (1, "b", "g")],
            id="no index, one call per event",
        ),
        pytest.param(
            [[call("f", "{}", id="a"), call("g", "{}", id="b")]],
            [(0, "a", "f"), (1, "b", "g")],
            id="no index, both calls in one event",
        ),
        pytest.param(
            [[call("f", id="a")], [call(arguments="{")], [call(arguments="}")], [call("g", "{}", id="b")]],
            [(0, "a", "f"), (0, None, None), (0, None, None), (1, "b", "g")],
            id="no index, fragments continue the last call",
        ),
        pytest.param(
            [[call("f", "{}")], [call("g", "{}")]],
            [(0, None, "f"), (1, None, "g")],
            id="no index and no id: another name opens a call",
        ),
        pytest.param(  # a text or thinking block counted first (LiteLLM, sglang, DeepSeek)
            [
                [call("f", index=1, id="a")],
                [call(arguments="{}", index=1)],
                [call("g", "{}", index=3, id="b")],
            ],
            [(0, "a", "f"), (0, None, None), (1, "b", "g")],
            id="sparse indexes from 1",
        ),
        pytest.param(
            [[call("f", "{}", index=0, id="a")], [call("g", "{}", index=0, id="b")]],
            [(0, "a", "f"), (1, "b", "g")],
            id="every call numbered 0",
        ),
        pytest.param(  # a backend that repeats id and name in every fragment
            [[call("f", "{", index=0, id="a")], [call("f", "}", index=0, id="a")]],
            [(0, "a", "f"), (0, "a", "f")],
            id="repeated id continues",
        ),
    ],
)
def test_streamed_tool_calls_are_numbered_densely_from_0_in_the_order_they_open(
    deltas: list[list[dict[str, Any]]], expected: list[tuple[int, str | None, str | None]]
) -> None:
    state = openai.StreamState()
    chunks = [chunk for calls in deltas for chunk in state.parse_chunk(event({"tool_calls": calls}))]
    assert [(c.index, c.id, c.name) for chunk in chunks for c in chunk.tool_calls] == expected


def test_each_choice_numbers_its_own_calls() -> None:
    state = openai.StreamState()
    state.parse_chunk(event({"tool_calls": [call("f", "{}", index=2, id="a")]}, index=0))
    [chunk] = state.parse_chunk(event({"tool_calls": [call("g", "{}", index=5, id="b")]}, index=1))
    assert (chunk.index, chunk.tool_calls[0].index) == (1, 0)


def test_role_only_delta_yields_nothing_and_usage_chunk_is_kept() -> None:
    state = openai.StreamState()
    assert state.parse_chunk(event({"role": "assistant", "content": ""})) == []
    usage_event = orjson.dumps(
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}
    ).decode()
    [chunk] = state.parse_chunk(usage_event)
    assert chunk.usage is not None and chunk.usage.total_tokens == 12


def test_done_sentinel_and_error_events() -> None:
    state = openai.StreamState()
    assert state.parse_chunk("[DONE]") == [] and state.done
    with pytest.raises(UpstreamRejected, match="mid-stream: overloaded"):
        openai.StreamState().parse_chunk('{"error": {"message": "overloaded"}}')
    with pytest.raises(UpstreamProtocol):
        openai.StreamState().parse_chunk("not json")


def test_done_finishes_the_choices_left_open_with_stop_or_tool_calls() -> None:
    state = openai.StreamState()
    call = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    state.parse_chunk(event({"role": "assistant", "content": "hi"}))
    state.parse_chunk(event({"tool_calls": [call]}, index=1))
    state.parse_chunk(event({"content": "done"}, "length", index=2))
    state.parse_chunk(event({"role": "assistant", "content": ""}, index=3))  # an empty answer
    closing = state.parse_chunk("[DONE]")
    assert [(c.index, c.finish_reason, c.has_output) for c in closing] == [
        (0, "stop", False),
        (1, "tool_calls", False),
        (3, "stop", False),
    ]
    assert state.parse_chunk("[DONE]") == []  # a second one finishes nothing twice


def test_reasoning_content_is_kept_apart() -> None:
    [chunk] = openai.StreamState().parse_chunk(event({"reasoning_content": "think"}))
    assert (chunk.reasoning, chunk.content) == ("think", "")


def test_upstream_errors_keep_their_meaning_without_leaking_keys() -> None:
    not_found = openai.error_from(
        404, b'{"error":{"message":"The model `x` does not exist","code":"model_not_found"}}', "x"
    )
    assert isinstance(not_found, ModelNotFound) and not_found.http_status == 404
    bad = openai.error_from(
        400, b'{"error":{"message":"bad stop","param":"stop","code":"invalid_value"}}', "m"
    )
    assert isinstance(bad, InvalidRequest) and (bad.param, bad.code) == ("stop", "invalid_value")
    key = openai.error_from(401, b'{"error":{"message":"Incorrect API key provided: sk-abc***xyz"}}', "m")
    assert key.http_status == 502 and "sk-" not in key.message and "api_key_env" in key.message
    private = openai.error_from(403, b'{"error":{"message":"kept local","code":"privacy_violation"}}', "m")
    assert (private.http_status, private.code) == (
        403,
        "privacy_violation",
    ) and "kept local" in private.message
    limited = openai.error_from(
        429, b'{"error":{"message":"slow"}}', "m", {"retry-after": "20", "x-other": "1"}
    )
    assert (limited.http_status, limited.headers) == (429, {"retry-after": "20"})
    assert openai.error_from(500, b"<html>", "m").http_status == 502


def test_a_backends_error_code_is_kept_but_not_for_the_gateways_own_key() -> None:
    quota = b'{"error":{"message":"You exceeded your current quota","code":"insufficient_quota"}}'
    assert openai.error_from(429, quota, "m").body()["error"]["code"] == "insufficient_quota"
    unavailable = b'{"error":{"message":"try later","code":"server_overloaded"}}'
    assert openai.error_from(503, unavailable, "m").body()["error"]["code"] == "server_overloaded"
    key = b'{"error":{"message":"Incorrect API key provided","code":"invalid_api_key"}}'
    assert openai.error_from(401, key, "m").body()["error"]["code"] is None  # the client's key is fine
    with pytest.raises(UpstreamRejected) as mid_stream:
        openai.StreamState().parse_chunk('{"error": {"message": "limit", "code": "rate_limit_exceeded"}}')
    assert mid_stream.value.body()["error"]["code"] == "rate_limit_exceeded"


def test_a_413_names_the_backend_whose_limit_it_is() -> None:
    """Often a proxy's page in front of the server: its words alone say nothing of whose limit."""
    error = openai.error_from(413, b"<html><center>413 Request Entity Too Large</center></html>", "m")
    assert isinstance(error, InvalidRequest) and error.http_status == 400
    assert error.message.startswith("the OpenAI-compatible backend refused the request as too large (413): ")
