"""The OpenAI <-> Gemini native translation, both ways, contracts/gemini.md's edge cases, and the I/O."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from pydantic import ValidationError
from pytest_httpx import HTTPXMock

from gateway.config import GeminiBackend
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    UpstreamProtocol,
    UpstreamRejected,
)
from gateway.images import Image
from gateway.providers import gemini
from gateway.providers.gemini import GeminiProvider, StreamState
from gateway.providers.ollama.request import THINK
from gateway.schemas import ChatRequest, Chunk, EmbeddingRequest
from tests.providers.streams import httpx_stream

pytestmark = pytest.mark.anyio  # applies to the async I/O tests at the end
KEY = "AIza-test-secret"
URL = "https://gemini.test/v1beta"
PNG = "iVBORw0KGgo="


def request(**fields: Any) -> ChatRequest:
    fields.setdefault("model", "gemini-2.5-flash")
    fields.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return ChatRequest.model_validate(fields)


def build(**fields: Any) -> dict[str, Any]:
    return gemini.build_request(request(**fields), "gemini-2.5-flash")


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


# ---- request ----


def test_worked_example_from_the_contract() -> None:
    body = build(
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What's the weather in Oslo and Bergen?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call("call_A", "get_weather", '{"city":"Oslo"}'),
                    call("call_B", "get_weather", '{"city":"Bergen"}'),
                ],
            },
            {"role": "tool", "tool_call_id": "call_A", "content": "4°C, snow"},
            {"role": "tool", "tool_call_id": "call_B", "content": '{"temp_c": 7}'},
        ],
        tools=[tool("get_weather", CITY)],
        tool_choice="auto",
        temperature=0.2,
        max_completion_tokens=300,
        stop="END",
    )
    assert body == {
        "systemInstruction": {"parts": [{"text": "Answer briefly."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "What's the weather in Oslo and Bergen?"}]},
            {
                "role": "model",
                "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Bergen"}}},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"result": "4°C, snow"}}},
                    {"functionResponse": {"name": "get_weather", "response": {"temp_c": 7}}},
                ],
            },
        ],
        "tools": [{"functionDeclarations": [{"name": "get_weather", "parametersJsonSchema": CITY}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
        "generationConfig": {"temperature": 0.2, "maxOutputTokens": 300, "stopSequences": ["END"]},
    }


def test_system_and_developer_messages_join_system_instruction_in_order_from_any_position() -> None:
    body = build(
        messages=[
            {"role": "system", "content": "one"},
            {"role": "user", "content": "hi"},
            {"role": "developer", "content": "two"},
            {"role": "system", "content": ""},
        ]
    )
    assert body["systemInstruction"] == {"parts": [{"text": "one"}, {"text": "two"}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


@pytest.mark.parametrize(
    ("messages", "contents"),
    [
        (  # two user messages in a row
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            [{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]}],
        ),
        (  # a tool result followed by a user message
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [call("c1", "f", "{}")]},
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
                {"role": "user", "content": "thanks"},
            ],
            [
                {"role": "user", "parts": [{"text": "q"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                {
                    "role": "user",
                    "parts": [
                        {"functionResponse": {"name": "f", "response": {"result": "done"}}},
                        {"text": "thanks"},
                    ],
                },
            ],
        ),
        (  # an empty assistant turn is dropped, so the user turns around it merge
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "b"},
            ],
            [{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]}],
        ),
        (  # two assistant messages in a row
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "x"},
                {"role": "assistant", "content": "y"},
            ],
            [
                {"role": "user", "parts": [{"text": "a"}]},
                {"role": "model", "parts": [{"text": "x"}, {"text": "y"}]},
            ],
        ),
    ],
)
def test_adjacent_same_role_turns_merge_so_roles_alternate(
    messages: list[dict[str, Any]], contents: list[dict[str, Any]]
) -> None:
    assert build(messages=messages)["contents"] == contents


def test_no_empty_parts_or_contents_are_sent() -> None:
    body = build(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "x"}]},
            {"role": "assistant", "content": "", "tool_calls": [call("c", "f", "")]},
        ]
    )
    assert body["contents"][1] == {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]}
    for content in body["contents"]:
        assert content["parts"]
        assert {"text": ""} not in content["parts"]


def test_a_conversation_of_only_system_text_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        build(messages=[{"role": "system", "content": "be nice"}])
    assert caught.value.param == "messages"


def test_image_data_urls_become_inline_data_with_their_mime_type() -> None:
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": "data:image/jpeg;base64,/9j/4AAQ"},
    ]
    assert build(messages=[{"role": "user", "content": parts}])["contents"][0]["parts"] == [
        {"text": "What is this?"},
        {"inlineData": {"mimeType": "image/png", "data": PNG}},
        {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
    ]


def test_content_parts_go_to_gemini_one_by_one_in_their_order() -> None:
    red, blue = f"data:image/png;base64,{PNG}", "https://images.test/blue.png"
    fetched = {blue: Image("image/webp", "UklGRg==")}
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First picture:"},
                {"type": "image_url", "image_url": {"url": red}},
                {"type": "text", "text": "Second picture:"},
                {"type": "image_url", "image_url": {"url": blue}},
                {"type": "text", "text": "Which one is red?"},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "The first."}, {"type": "refusal", "refusal": "No more."}],
        },
    ]
    body = gemini.build_request(request(messages=messages), "gemini-2.5-flash", images=fetched)
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "First picture:"},
                {"inlineData": {"mimeType": "image/png", "data": PNG}},
                {"text": "Second picture:"},
                {"inlineData": {"mimeType": "image/webp", "data": "UklGRg=="}},
                {"text": "Which one is red?"},
            ],
        },
        {"role": "model", "parts": [{"text": "The first."}, {"text": "No more."}]},
    ]


def test_audio_and_file_parts_become_inline_data_with_their_mime_types() -> None:
    content = [
        {"type": "text", "text": "Transcribe both and summarise the PDF."},
        {"type": "input_audio", "input_audio": {"data": "UklGRiQ=", "format": "wav"}},
        {"type": "input_audio", "input_audio": {"data": "SUQzBA==", "format": "mp3"}},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
    ]
    assert build(messages=[{"role": "user", "content": content}])["contents"][0]["parts"] == [
        {"text": "Transcribe both and summarise the PDF."},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRiQ="}},
        {"inlineData": {"mimeType": "audio/mpeg", "data": "SUQzBA=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
    ]


@pytest.mark.parametrize(
    ("part", "param"),
    [
        (
            {"type": "input_audio", "input_audio": {"data": "UklGRiQ=", "format": "flac"}},
            "input_audio.format",
        ),
        ({"type": "input_audio", "input_audio": {"data": "UklGRiQ="}}, "input_audio.format"),
        ({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}, "input_audio.data"),
        ({"type": "input_audio", "input_audio": {"format": "mp3"}}, "input_audio.data"),
        ({"type": "file", "file": {"file_id": "file-abc123"}}, "file"),
        ({"type": "file", "file": {"file_data": "data:application/pdf;base64,@@@"}}, "file.file_data"),
        ({"type": "file", "file": {"filename": "a.pdf", "file_data": "JVBERi0="}}, "file.file_data"),
        ({"type": "file", "file": {"file_data": "data:application/pdf,%PDF"}}, "file.file_data"),
        ({"type": "file", "file": {"file_data": "data:;base64,JVBERi0="}}, "file.file_data"),
    ],
)
def test_audio_and_file_parts_gemini_cannot_be_given_are_refused_with_the_field_named(
    part: dict[str, Any], param: str
) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Listen:"}, part]}]
    with pytest.raises(InvalidRequest) as caught:
        build(messages=messages)
    assert caught.value.param == f"messages[0].content[1].{param}"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://example.org/cat.png", "base64 data URL"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png,rawbytes", "base64-encoded"),
    ],
)
def test_unusable_image_urls_are_refused_with_the_field_named(url: str, words: str) -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
    ]
    with pytest.raises(InvalidRequest, match=words) as caught:
        build(messages=messages)
    assert caught.value.param == "messages[2].content[0].image_url.url"


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"text"'])
def test_tool_call_arguments_that_are_not_a_json_object_are_refused(arguments: str) -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call("a", "f", "{}"), call("b", "f", arguments)]},
    ]
    with pytest.raises(InvalidRequest) as caught:
        build(messages=messages)
    assert caught.value.param == "messages[1].tool_calls[1].function.arguments"


@pytest.mark.parametrize(
    ("content", "response"),
    [
        ("4°C, snow", {"result": "4°C, snow"}),
        ('{"temp_c": 7}', {"temp_c": 7}),
        ("[1, 2]", {"result": [1, 2]}),
        ("42", {"result": 42}),
        ("", {"result": ""}),
    ],
)
def test_function_responses_are_always_objects(content: str, response: dict[str, Any]) -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call("c1", "f", "{}")]},
        {"role": "tool", "tool_call_id": "c1", "content": content},
    ]
    part = build(messages=messages)["contents"][2]["parts"][0]
    assert part == {"functionResponse": {"name": "f", "response": response}}


def test_tool_results_keep_call_order_and_resolve_names_through_ids() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call("c1", "first", "{}"), call("c2", "second", "{}")]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
    ]
    parts = build(messages=messages)["contents"][2]["parts"]
    assert [(p["functionResponse"]["name"], p["functionResponse"]["response"]) for p in parts] == [
        ("first", {"result": 1}),
        ("second", {"result": 2}),
    ]


def test_tool_results_sent_out_of_call_order_go_to_gemini_in_call_order() -> None:
    messages = [
        {"role": "user", "content": "Weather in Oslo and Bergen?"},
        {
            "role": "assistant",
            "tool_calls": [
                call("call_A", "get_weather", '{"city":"Oslo"}'),
                call("call_B", "get_weather", '{"city":"Bergen"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "call_B", "content": "Bergen: 7C rain"},
        {"role": "tool", "tool_call_id": "call_A", "content": "Oslo: -4C snow"},
    ]
    parts = build(messages=messages)["contents"][2]["parts"]
    assert parts == [
        {"functionResponse": {"name": "get_weather", "response": {"result": "Oslo: -4C snow"}}},
        {"functionResponse": {"name": "get_weather", "response": {"result": "Bergen: 7C rain"}}},
    ]


def test_tool_results_answering_no_call_of_the_turn_before_come_after_the_others_in_their_order() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call("old", "lookup", "{}")]},
        {"role": "tool", "tool_call_id": "old", "content": "0"},
        {"role": "assistant", "tool_calls": [call("c1", "first", "{}"), call("c2", "second", "{}")]},
        {"role": "tool", "tool_call_id": "stray", "name": "named", "content": "x"},
        {"role": "system", "content": "between results"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
        {"role": "tool", "tool_call_id": "old", "content": "again"},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
    ]
    parts = build(messages=messages)["contents"][4]["parts"]
    assert [(p["functionResponse"]["name"], p["functionResponse"]["response"]) for p in parts] == [
        ("first", {"result": 1}),
        ("second", {"result": 2}),
        ("named", {"result": "x"}),
        ("lookup", {"result": "again"}),
    ]


def test_a_tool_result_with_no_matching_call_is_refused() -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "nope", "content": "x"}]
    with pytest.raises(InvalidRequest) as caught:
        build(messages=messages)
    assert caught.value.param == "messages[1].tool_call_id"


def test_sampling_parameters_map_to_generation_config() -> None:
    config = build(
        temperature=0.7,
        top_p=0.9,
        max_tokens=50,
        max_completion_tokens=80,
        stop=["a", "b"],
        seed=7,
        n=2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        user="someone",
        parallel_tool_calls=True,
    )["generationConfig"]
    assert config == {
        "temperature": 0.7,
        "topP": 0.9,
        "maxOutputTokens": 80,
        "stopSequences": ["a", "b"],
        "seed": 7,
        "candidateCount": 2,
        "presencePenalty": 0.5,
        "frequencyPenalty": -0.5,
    }


def test_no_generation_config_when_nothing_is_set() -> None:
    assert "generationConfig" not in build()
    assert build(max_tokens=10)["generationConfig"] == {"maxOutputTokens": 10}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop": ["1", "2", "3", "4", "5", "6"]}, "stop"),
        ({"seed": 2**31}, "seed"),
        ({"seed": -(2**31) - 1}, "seed"),
    ],
)
def test_limits_gemini_enforces_are_refused_up_front(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        build(**fields)
    assert caught.value.param == param


def test_int32_seed_edges_pass() -> None:
    assert build(seed=-(2**31))["generationConfig"]["seed"] == -(2**31)
    assert build(seed=2**31 - 1)["generationConfig"]["seed"] == 2**31 - 1


def test_json_object_sets_the_json_mime_type_only() -> None:
    config = build(response_format={"type": "json_object"})["generationConfig"]
    assert config == {"responseMimeType": "application/json"}
    assert "generationConfig" not in build(response_format={"type": "text"})


def test_json_schema_goes_out_as_response_json_schema_without_unknown_keywords() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "pattern": "^a", "minLength": 1},
            "kind": {"const": "cat"},
            "tags": {"type": "array", "items": {"type": "string", "examples": ["x"]}},
            "ref": {"$ref": "#/$defs/thing", "description": "dropped sibling"},
        },
        "$defs": {"thing": {"type": "integer", "default": 3}},
        "required": ["pattern"],
        "additionalProperties": False,
    }
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "out", "strict": True, "schema": schema},
    }
    config = build(response_format=response_format)["generationConfig"]
    assert config == {
        "responseMimeType": "application/json",
        "responseJsonSchema": {
            "type": "object",
            "properties": {
                "pattern": {"type": "string"},
                "kind": {"enum": ["cat"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "ref": {"$ref": "#/$defs/thing"},
            },
            "$defs": {"thing": {"type": "integer"}},
            "required": ["pattern"],
            "additionalProperties": False,
        },
    }


def test_tools_become_function_declarations_in_one_tool() -> None:
    described = tool("b", CITY)
    described["function"]["description"] = "Does b"
    described["function"]["strict"] = True
    body = build(tools=[tool("a"), described])
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {"name": "a"},
                {"name": "b", "description": "Does b", "parametersJsonSchema": CITY},
            ]
        }
    ]
    assert "toolConfig" not in body


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("none", {"mode": "NONE"}),
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ({"type": "function", "function": {"name": "b"}}, {"mode": "ANY", "allowedFunctionNames": ["b"]}),
        (
            {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [tool("b")]}},
            {"mode": "VALIDATED", "allowedFunctionNames": ["b"]},
        ),
        (
            {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [tool("a"), tool("b")]}},
            {"mode": "ANY", "allowedFunctionNames": ["a", "b"]},
        ),
    ],
)
def test_tool_choice_maps_to_function_calling_config(choice: Any, config: dict[str, Any]) -> None:
    body = build(tools=[tool("a"), tool("b")], tool_choice=choice)
    assert body["toolConfig"] == {"functionCallingConfig": config}
    assert len(body["tools"][0]["functionDeclarations"]) == 2


def test_tool_choice_naming_an_unknown_function_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        build(tools=[tool("a")], tool_choice={"type": "function", "function": {"name": "zzz"}})
    assert caught.value.param == "tool_choice"


@pytest.mark.parametrize(
    ("allowed", "words"),
    [
        ({"mode": "required", "tools": [tool("a"), tool("zzz")]}, "unknown function 'zzz'"),
        ({"mode": "sometimes", "tools": [tool("a")]}, "'auto' or 'required'"),
        ({"mode": "auto", "tools": []}, "at least one function"),
        ({"mode": "auto"}, "at least one function"),
    ],
)
def test_allowed_tools_gemini_cannot_follow_are_refused_saying_why(
    allowed: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidRequest, match=words) as caught:
        build(tools=[tool("a")], tool_choice={"type": "allowed_tools", "allowed_tools": allowed})
    assert caught.value.param == "tool_choice"


def test_thought_signatures_ride_in_tool_call_ids_and_come_back_on_the_same_part() -> None:
    completion = gemini.parse_response(
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [
                            {"functionCall": {"name": "f", "args": {"x": 1}}, "thoughtSignature": "c2ln+/="},
                            {"functionCall": {"name": "f", "args": {"x": 2}}},
                        ],
                    },
                    "finishReason": "STOP",
                }
            ]
        }
    )
    first, second = completion.choices[0].tool_calls
    assert first.id is not None and first.id.endswith("__ts__c2ln+/=")
    assert second.id is not None and "__ts__" not in second.id
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call(c.id or "", "f", c.arguments) for c in (first, second)]},
        {"role": "tool", "tool_call_id": first.id, "content": "1"},
        {"role": "tool", "tool_call_id": second.id, "content": "2"},
    ]
    contents = build(messages=messages)["contents"]
    assert contents[1]["parts"] == [
        {"functionCall": {"name": "f", "args": {"x": 1}}, "thoughtSignature": "c2ln+/="},
        {"functionCall": {"name": "f", "args": {"x": 2}}},
    ]
    assert len(contents[2]["parts"]) == 2


def test_gemini_call_ids_reach_the_client_and_go_back_on_the_call_and_its_result() -> None:
    completion = gemini.parse_response(
        {
            "candidates": [
                candidate(
                    {
                        "functionCall": {"id": "fc-1", "name": "f", "args": {"x": 1}},
                        "thoughtSignature": "c2ln",
                    },
                    {"functionCall": {"id": "fc__ts__2", "name": "f", "args": {"x": 2}}},
                    {"functionCall": {"name": "g"}},
                )
            ]
        }
    )
    calls = completion.choices[0].tool_calls
    ids = [c.id or "" for c in calls]
    assert ids[0].startswith("call_") and ids[0].endswith("__ts__c2ln__id__fc-1")
    assert ids[1].startswith("call_") and ids[1].endswith("__id__fc__ts__2")
    assert ids[2].startswith("call_") and "__id__" not in ids[2]
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call(c.id or "", c.name or "", c.arguments) for c in calls]},
        *({"role": "tool", "tool_call_id": i, "content": str(n)} for n, i in enumerate(ids)),
    ]
    contents = build(messages=messages)["contents"]
    assert contents[1]["parts"] == [
        {"functionCall": {"id": "fc-1", "name": "f", "args": {"x": 1}}, "thoughtSignature": "c2ln"},
        {"functionCall": {"id": "fc__ts__2", "name": "f", "args": {"x": 2}}},
        {"functionCall": {"name": "g", "args": {}}},
    ]
    assert contents[2]["parts"] == [
        {"functionResponse": {"id": "fc-1", "name": "f", "response": {"result": 0}}},
        {"functionResponse": {"id": "fc__ts__2", "name": "f", "response": {"result": 1}}},
        {"functionResponse": {"name": "g", "response": {"result": 2}}},
    ]


# ---- response ----


def candidate(*parts: dict[str, Any], finish: str | None = "STOP", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}, **extra}
    if finish is not None:
        out["finishReason"] = finish
    return out


def test_text_and_thought_parts_are_kept_apart() -> None:
    completion = gemini.parse_response(
        {
            "candidates": [
                candidate(
                    {"text": "Let me think.", "thought": True},
                    {"text": "The sky", "thoughtSignature": "abc"},
                    {"text": " is blue."},
                )
            ],
            "usageMetadata": {
                "promptTokenCount": 41,
                "cachedContentTokenCount": 32,
                "candidatesTokenCount": 18,
                "thoughtsTokenCount": 120,
            },
        }
    )
    choice = completion.choices[0]
    assert (choice.content, choice.reasoning, choice.finish_reason) == (
        "The sky is blue.",
        "Let me think.",
        "stop",
    )
    assert completion.usage.as_dict() == {  # reasoning inside completion_tokens, and said apart
        "prompt_tokens": 41,
        "completion_tokens": 138,
        "total_tokens": 179,
        "prompt_tokens_details": {"cached_tokens": 32},
        "completion_tokens_details": {"reasoning_tokens": 120},
    }


def test_function_calls_become_tool_calls_with_fresh_ids() -> None:
    completion = gemini.parse_response(
        {
            "candidates": [
                candidate(
                    {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
                    {"functionCall": {"name": "ping"}},
                )
            ]
        }
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.content is None
    assert [(c.index, c.name, orjson.loads(c.arguments)) for c in choice.tool_calls] == [
        (0, "get_weather", {"city": "Oslo"}),
        (1, "ping", {}),
    ]
    ids = [c.id or "" for c in choice.tool_calls]
    assert all(i.startswith("call_") and len(i) == 29 for i in ids)
    assert len(set(ids)) == 2


@pytest.mark.parametrize(
    ("native", "mapped"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("UNEXPECTED_TOOL_CALL", "stop"),
        ("LANGUAGE", "stop"),
        ("OTHER", "stop"),
        ("FINISH_REASON_UNSPECIFIED", "stop"),
        ("SOMETHING_NEW_IN_2027", "stop"),
        (None, "stop"),
    ],
)
def test_finish_reasons_map_by_meaning(native: str | None, mapped: str) -> None:
    completion = gemini.parse_response({"candidates": [candidate({"text": "x"}, finish=native)]})
    assert completion.choices[0].finish_reason == mapped


def test_an_answer_without_usage_metadata_is_not_counted() -> None:
    counted = gemini.parse_response(
        {"candidates": [candidate({"text": "x"})], "usageMetadata": {"promptTokenCount": 3}}
    )
    unreported = gemini.parse_response({"candidates": [candidate({"text": "x"})]})
    blocked = gemini.parse_response({"promptFeedback": {"blockReason": "SAFETY"}})
    assert (counted.counted, unreported.counted, blocked.counted) == (True, False, False)
    assert unreported.usage.as_dict() == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_max_tokens_with_function_calls_stays_length() -> None:
    assert gemini.finish_reason("MAX_TOKENS", True) == "length"
    assert gemini.finish_reason("STOP", True) == "tool_calls"


def test_blocked_prompt_is_one_content_filter_choice() -> None:
    completion = gemini.parse_response(
        {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5}}
    )
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert (choice.content, choice.refusal, choice.finish_reason) == (
        None,
        "blocked: SAFETY",
        "content_filter",
    )
    assert completion.usage.prompt_tokens == 5


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"finishReason": "SAFETY"}, "content_filter"),
        ({"content": {"role": "model"}, "finishReason": "MAX_TOKENS"}, "length"),
        ({"content": {}, "finishReason": "STOP"}, "stop"),
    ],
)
def test_candidates_without_parts_give_empty_content(raw: dict[str, Any], reason: str) -> None:
    choice = gemini.parse_response({"candidates": [raw]}).choices[0]
    assert (choice.content, choice.tool_calls, choice.finish_reason) == ("", [], reason)


@pytest.mark.parametrize(
    "candidates",
    [
        [candidate({"text": "first"}), candidate({"text": "second"}, index=1)],  # proto3 left out index 0
        [candidate({"text": "first"}), candidate({"text": "second"})],  # no index at all: position
        [candidate({"text": "second"}, index=1), candidate({"text": "first"}, index=0)],
    ],
)
def test_several_candidates_become_choices_in_index_order(candidates: list[dict[str, Any]]) -> None:
    completion = gemini.parse_response({"candidates": candidates})
    assert [(c.index, c.content) for c in completion.choices] == [(0, "first"), (1, "second")]


def test_missing_usage_counts_are_zero() -> None:
    completion = gemini.parse_response({"candidates": [candidate({"text": "x"})]})
    assert completion.usage.as_dict() == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize("body", [[], "text", {"candidates": []}, {"modelVersion": "x"}])
def test_answers_without_candidates_or_block_are_protocol_errors(body: Any) -> None:
    with pytest.raises(UpstreamProtocol):
        gemini.parse_response(body)


# ---- stream ----


def run(events: list[dict[str, Any]]) -> tuple[list[Chunk], StreamState]:
    state = StreamState()
    chunks = [chunk for event in events for chunk in gemini.parse_chunk(event, state)]
    return chunks, state


def test_stream_of_the_contract_example() -> None:
    chunks, state = run(
        [
            {
                "candidates": [{"content": {"role": "model", "parts": [{"text": "The sky"}]}, "index": 0}],
                "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
            },
            {
                "candidates": [
                    {"content": {"role": "model", "parts": [{"text": " is blue."}]}, "finishReason": "STOP"}
                ],
                "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 5, "totalTokenCount": 14},
            },
        ]
    )
    assert state.done
    assert "".join(c.content for c in chunks) == "The sky is blue."
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.as_dict()["total_tokens"] == 14
    assert [c.finish_reason for c in chunks].count("stop") == 1
    assert state.close() == []


def test_stream_function_calls_get_dense_indexes_and_finish_as_tool_calls() -> None:
    chunks, state = run(
        [
            {"candidates": [candidate({"functionCall": {"name": "a", "args": {"n": 1}}}, finish=None)]},
            {"candidates": [candidate({"functionCall": {"name": "b"}}, finish="STOP")]},
        ]
    )
    calls = [call for chunk in chunks for call in chunk.tool_calls]
    assert [(c.index, c.name, c.arguments) for c in calls] == [(0, "a", '{"n":1}'), (1, "b", "{}")]
    assert all(c.id and c.id.startswith("call_") for c in calls)
    assert chunks[-1].finish_reason == "tool_calls"
    assert state.done


def test_stream_function_call_ids_from_gemini_reach_the_client() -> None:
    chunks, _ = run([{"candidates": [candidate({"functionCall": {"id": "fc-9", "name": "a"}})]}])
    (delta,) = [call for chunk in chunks for call in chunk.tool_calls]
    assert delta.id is not None and delta.id.startswith("call_") and delta.id.endswith("__id__fc-9")


def test_stream_thoughts_are_reasoning_and_empty_or_signature_only_parts_are_skipped() -> None:
    chunks, _ = run(
        [
            {"candidates": [candidate({"text": "hmm", "thought": True}, finish=None)]},
            {"candidates": [candidate({"text": ""}, {"thoughtSignature": "sig"}, finish=None)]},
            {"candidates": [candidate({"text": "ok"})]},
        ]
    )
    assert [(c.reasoning, c.content, c.finish_reason) for c in chunks] == [
        ("hmm", "", None),
        ("", "ok", None),
        ("", "", "stop"),
    ]


def test_stream_usage_last_one_wins_even_after_the_finish() -> None:
    chunks, state = run(
        [
            {"candidates": [candidate({"text": "x"})], "usageMetadata": {"promptTokenCount": 3}},
            {"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "thoughtsTokenCount": 2}},
        ]
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 0
    tail = state.close()
    assert len(tail) == 1 and tail[0].finish_reason is None
    assert tail[0].usage is not None and tail[0].usage.as_dict() == {
        "prompt_tokens": 3,
        "completion_tokens": 6,
        "total_tokens": 9,
        "completion_tokens_details": {"reasoning_tokens": 2},
    }


def test_stream_finishes_each_candidate_once_and_closes_open_ones_with_stop() -> None:
    chunks, state = run(
        [
            {
                "candidates": [
                    candidate({"text": "a"}, finish=None),
                    candidate({"text": "b"}, index=1, finish=None),
                ]
            },
            {"candidates": [candidate({"text": "c"}, finish="MAX_TOKENS")]},
            {"candidates": [candidate(finish="MAX_TOKENS")]},
        ]
    )
    assert [(c.index, c.finish_reason) for c in chunks if c.finish_reason] == [(0, "length")]
    assert [(c.index, c.content) for c in chunks if c.content] == [(0, "a"), (1, "b"), (0, "c")]
    assert [(c.index, c.finish_reason) for c in state.close()] == [(1, "stop")]


def test_stream_with_no_candidate_at_all_is_a_protocol_error() -> None:
    _, state = run([{"usageMetadata": {"promptTokenCount": 3}}])
    with pytest.raises(UpstreamProtocol, match="without any candidate"):
        state.close()


def test_stream_blocked_prompt_finishes_with_content_filter() -> None:
    chunks, state = run([{"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}])
    assert state.done
    assert [(c.index, c.refusal, c.finish_reason) for c in chunks] == [
        (0, "blocked: PROHIBITED_CONTENT", None),
        (0, "", "content_filter"),
    ]


@pytest.mark.parametrize(
    ("error", "kind", "status"),
    [
        ({"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota"}, UpstreamRejected, 429),
        ({"code": 500, "status": "INTERNAL", "message": "boom"}, UpstreamRejected, 502),
        ({"code": 503, "status": "UNAVAILABLE", "message": "busy"}, UpstreamRejected, 503),
        ({"message": "no code"}, UpstreamRejected, 502),
    ],
)
def test_mid_stream_error_payloads_are_raised(
    error: dict[str, Any], kind: type[GatewayError], status: int
) -> None:
    state = StreamState()
    state.parse_chunk({"candidates": [candidate({"text": "a"}, finish=None)]})
    with pytest.raises(kind) as caught:
        state.parse_chunk({"error": error})
    assert caught.value.http_status == status


def test_stream_event_that_is_not_an_object_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocol):
        StreamState().parse_chunk([1, 2])


# ---- errors ----


def google_error(code: int, status: str, message: str = "msg", details: list[Any] | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return orjson.dumps({"error": error})


@pytest.mark.parametrize(
    ("status", "content", "kind", "http_status"),
    [
        (400, google_error(400, "INVALID_ARGUMENT", "Unknown name 'foo'"), InvalidRequest, 400),
        (400, google_error(400, "FAILED_PRECONDITION", "billing"), InvalidRequest, 400),
        (401, google_error(401, "UNAUTHENTICATED"), UpstreamRejected, 502),
        (403, google_error(403, "PERMISSION_DENIED", "unregistered callers"), UpstreamRejected, 502),
        (404, google_error(404, "NOT_FOUND", "models/gemini-9 is not found"), ModelNotFound, 404),
        (429, google_error(429, "RESOURCE_EXHAUSTED"), UpstreamRejected, 429),
        (500, google_error(500, "INTERNAL"), UpstreamRejected, 502),
        (503, google_error(503, "UNAVAILABLE"), UpstreamRejected, 503),
        (504, google_error(504, "DEADLINE_EXCEEDED"), UpstreamRejected, 504),
        (502, b"<html>Bad Gateway</html>", UpstreamRejected, 502),
        (404, b"", ModelNotFound, 404),
        (400, b"[" + google_error(400, "INVALID_ARGUMENT") + b"]", InvalidRequest, 400),
    ],
)
def test_google_errors_map_by_status_name(
    status: int, content: bytes, kind: type[GatewayError], http_status: int
) -> None:
    error = gemini.error_from(status, content, "gemini-9")
    assert type(error) is kind
    assert error.http_status == http_status


def test_not_found_names_the_model_without_the_resource_prefix() -> None:
    error = gemini.error_from(404, google_error(404, "NOT_FOUND"), "models/gemini-9")
    assert error.message == "The model 'gemini-9' is not available on Gemini"
    assert error.code == "model_not_found"


def test_invalid_api_key_is_the_gateways_problem_not_the_clients() -> None:
    details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]
    error = gemini.error_from(400, google_error(400, "INVALID_ARGUMENT", "API key not valid.", details), "m")
    assert isinstance(error, UpstreamRejected)
    assert error.http_status == 502
    assert error.error_type != "invalid_request_error"
    assert KEY not in error.message


def test_upstream_message_is_kept_in_the_error() -> None:
    error = gemini.error_from(400, google_error(400, "INVALID_ARGUMENT", "Unknown name 'foo'"), "m")
    assert "Unknown name 'foo'" in error.message


@pytest.mark.parametrize(
    ("details", "headers", "retry"),
    [
        ([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}], {}, "37"),
        ([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.1s"}], {}, "3"),
        (
            [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}],
            {"retry-after": "5"},
            "5",
        ),
        ([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "soon"}], {}, None),
        ([], {}, None),
    ],
)
def test_rate_limits_carry_retry_after(
    details: list[Any], headers: dict[str, str], retry: str | None
) -> None:
    error = gemini.error_from(429, google_error(429, "RESOURCE_EXHAUSTED", "quota", details), "m", headers)
    assert isinstance(error, UpstreamRejected)
    assert error.upstream_status == 429 and error.retryable
    assert error.headers.get("retry-after") == retry


# ---- I/O ----

CHAT = request()


@pytest.fixture
async def provider() -> AsyncIterator[GeminiProvider]:
    async with httpx.AsyncHTTPTransport() as transport:
        yield GeminiProvider(GeminiBackend(name="g", type="gemini", base_url=URL), transport, api_key=KEY)


def assert_keyed(sent: httpx.Request | None) -> httpx.Request:
    assert sent is not None
    assert sent.headers["x-goog-api-key"] == KEY
    assert KEY not in str(sent.url)
    assert "key=" not in str(sent.url)
    return sent


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "models/gemini-2.5-flash"])
async def test_complete_posts_generate_content_with_the_key_in_a_header(
    httpx_mock: HTTPXMock, provider: GeminiProvider, model: str
) -> None:
    httpx_mock.add_response(
        method="POST",
        url=URL + "/models/gemini-2.5-flash:generateContent",
        json={"candidates": [candidate({"text": "yo"})], "usageMetadata": {"promptTokenCount": 1}},
    )
    completion = await provider.complete(CHAT, model)
    assert completion.choices[0].content == "yo"
    sent = assert_keyed(httpx_mock.get_request())
    assert orjson.loads(sent.content) == {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}


async def test_stream_reassembles_sse_events_split_across_reads(
    httpx_mock: HTTPXMock, provider: GeminiProvider
) -> None:
    body = (
        b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"The sky"}]},"index":0}],'
        b'"usageMetadata":{"promptTokenCount":9,"totalTokenCount":9}}\r\n\r\n'
        b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":" is blue."}]},'
        b'"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":5}}\r\n\r\n'
    )
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    httpx_mock.add_response(
        method="POST",
        url=URL + "/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        stream=httpx_stream(pieces),
    )
    chunks = [chunk async for chunks in provider.stream(CHAT, "gemini-2.5-flash") for chunk in chunks]
    assert "".join(c.content for c in chunks) == "The sky is blue."
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 14
    sent = assert_keyed(httpx_mock.get_request())
    assert sent.url.params["alt"] == "sse"


async def test_stream_body_ending_without_finish_reason_finishes_its_choices_with_stop(
    httpx_mock: HTTPXMock, provider: GeminiProvider
) -> None:
    httpx_mock.add_response(
        url=URL + "/models/m:streamGenerateContent?alt=sse",
        stream=httpx_stream(
            [
                b'data: {"candidates":[{"content":{"parts":[{"text":"All of "}]}}]}\n\n',
                b'data: {"candidates":[{"content":{"parts":[{"text":"the answer."}]}}],'
                b'"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":5}}\n\n',
            ]
        ),
    )
    chunks = [chunk async for chunks in provider.stream(CHAT, "m") for chunk in chunks]
    assert "".join(c.content for c in chunks) == "All of the answer."
    assert [(c.index, c.finish_reason) for c in chunks if c.finish_reason] == [(0, "stop")]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 9


async def test_stream_with_a_broken_event_is_a_protocol_error(
    httpx_mock: HTTPXMock, provider: GeminiProvider
) -> None:
    httpx_mock.add_response(
        url=URL + "/models/m:streamGenerateContent?alt=sse", stream=httpx_stream([b"data: {oops\n\n"])
    )
    with pytest.raises(UpstreamProtocol, match="malformed JSON"):
        _ = [chunk async for chunks in provider.stream(CHAT, "m") for chunk in chunks]


async def test_stream_error_status_maps_before_any_chunk(
    httpx_mock: HTTPXMock, provider: GeminiProvider
) -> None:
    httpx_mock.add_response(
        url=URL + "/models/gemini-9:streamGenerateContent?alt=sse",
        status_code=404,
        content=google_error(404, "NOT_FOUND"),
    )
    with pytest.raises(ModelNotFound, match="'gemini-9'"):
        _ = [chunk async for chunks in provider.stream(CHAT, "gemini-9") for chunk in chunks]


async def test_rate_limit_keeps_the_retry_after_header(
    httpx_mock: HTTPXMock, provider: GeminiProvider
) -> None:
    httpx_mock.add_response(
        url=URL + "/models/m:generateContent",
        status_code=429,
        headers={"retry-after": "12"},
        content=google_error(429, "RESOURCE_EXHAUSTED"),
    )
    with pytest.raises(UpstreamRejected) as caught:
        await provider.complete(CHAT, "m")
    assert (caught.value.http_status, caught.value.headers) == (429, {"retry-after": "12"})


async def test_embed_sends_a_batch_naming_the_model_in_each_request(
    httpx_mock: HTTPXMock, provider: GeminiProvider
) -> None:
    httpx_mock.add_response(
        url=URL + "/models/gemini-embedding-001:batchEmbedContents",
        json={"embeddings": [{"values": [0.1, 0.2]}, {"values": [0.3, 0.4]}]},
    )
    result = await provider.embed(
        EmbeddingRequest(model="e", input=["first", "second"], dimensions=2), "gemini-embedding-001"
    )
    # Gemini cuts to outputDimensionality but does not rescale: the client gets unit vectors, as
    # from OpenAI's text-embedding-3 with `dimensions`
    assert result.vectors == [pytest.approx([0.4472136, 0.8944272]), pytest.approx([0.6, 0.8])]
    assert result.prompt_tokens == 0
    sent = assert_keyed(httpx_mock.get_request())
    assert orjson.loads(sent.content) == {
        "requests": [
            {
                "model": "models/gemini-embedding-001",
                "outputDimensionality": 2,
                "content": {"parts": [{"text": "first"}]},
            },
            {
                "model": "models/gemini-embedding-001",
                "outputDimensionality": 2,
                "content": {"parts": [{"text": "second"}]},
            },
        ]
    }


async def test_embed_refuses_token_arrays(provider: GeminiProvider) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await provider.embed(EmbeddingRequest(model="e", input=[1, 2, 3]), "e")
    assert caught.value.param == "input"


async def test_embed_with_a_missing_vector_is_a_protocol_error(
    httpx_mock: HTTPXMock, provider: GeminiProvider
) -> None:
    httpx_mock.add_response(
        url=URL + "/models/e:batchEmbedContents", json={"embeddings": [{"values": [1.0]}]}
    )
    with pytest.raises(UpstreamProtocol):
        await provider.embed(EmbeddingRequest(model="e", input=["a", "b"]), "e")


async def test_list_models_follows_pages_and_keeps_usable_models(
    httpx_mock: HTTPXMock, provider: GeminiProvider
) -> None:
    httpx_mock.add_response(
        url=URL + "/models?pageSize=1000",
        json={
            "models": [
                {"name": "models/gemini-2.5-flash", "supportedGenerationMethods": ["generateContent"],
                 "thinking": True},
                {"name": "models/aqa", "supportedGenerationMethods": ["generateAnswer"]},
            ],
            "nextPageToken": "p2",
        },
    )  # fmt: skip
    httpx_mock.add_response(
        url=URL + "/models?pageSize=1000&pageToken=p2",
        json={
            "models": [
                {"name": "models/gemini-embedding-001", "supportedGenerationMethods": ["embedContent"]}
            ]
        },
    )
    models = await provider.list_models()
    assert [(m.id, m.owned_by, m.capabilities) for m in models] == [
        ("gemini-2.5-flash", "google", ("completion", "thinking")),
        ("gemini-embedding-001", "google", ("embedding",)),
    ]
    for sent in httpx_mock.get_requests():
        assert_keyed(sent)


async def test_probe_lists_one_model(httpx_mock: HTTPXMock, provider: GeminiProvider) -> None:
    httpx_mock.add_response(url=URL + "/models?pageSize=1", json={"models": []})
    await provider.probe()
    assert_keyed(httpx_mock.get_request())


async def test_probe_with_a_refused_key_raises(httpx_mock: HTTPXMock, provider: GeminiProvider) -> None:
    httpx_mock.add_response(
        url=URL + "/models?pageSize=1", status_code=403, content=google_error(403, "PERMISSION_DENIED")
    )
    with pytest.raises(UpstreamRejected) as caught:
        await provider.probe()
    assert caught.value.http_status == 502


def test_log_probabilities_are_asked_for_and_come_back_in_openais_shape() -> None:
    assert "responseLogprobs" not in build().get("generationConfig", {})
    assert build(logprobs=True)["generationConfig"] == {"responseLogprobs": True}
    assert build(logprobs=True, top_logprobs=2)["generationConfig"] == {
        "responseLogprobs": True,
        "logprobs": 2,
    }
    result = {
        "chosenCandidates": [{"token": "Hi", "logProbability": -0.5}, {"token": "é", "logProbability": -1.5}],
        "topCandidates": [
            {
                "candidates": [
                    {"token": "Hi", "logProbability": -0.5},
                    {"token": "Hey", "logProbability": -2.0},
                ]
            },
            {"candidates": [{"token": "é", "logProbability": -1.5}]},
        ],
    }
    expected = [
        {
            "token": "Hi",
            "logprob": -0.5,
            "bytes": [72, 105],
            "top_logprobs": [
                {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                {"token": "Hey", "logprob": -2.0, "bytes": [72, 101, 121]},
            ],
        },
        {
            "token": "é",
            "logprob": -1.5,
            "bytes": [195, 169],
            "top_logprobs": [{"token": "é", "logprob": -1.5, "bytes": [195, 169]}],
        },
    ]
    whole = gemini.parse_response({"candidates": [candidate({"text": "Hié"}, logprobsResult=result)]})
    assert whole.choices[0].logprobs == expected
    assert gemini.parse_response({"candidates": [candidate({"text": "Hi"})]}).choices[0].logprobs is None

    chunks, _ = run([{"candidates": [candidate({"text": "Hi"}, {"text": "é"}, logprobsResult=result)]}])
    assert [(c.content, c.logprobs) for c in chunks if c.content] == [("Hi", expected), ("é", None)]


def test_top_logprobs_out_of_openais_range_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError) as refused:
        request(logprobs=True, top_logprobs=21)
    assert refused.value.errors()[0]["loc"] == ("top_logprobs",)


@pytest.mark.parametrize(
    ("model", "thinks", "effort", "thinking"),
    [
        ("gemini-2.5-flash", True, "none", {"thinkingBudget": 0, "includeThoughts": False}),
        ("gemini-2.5-flash", True, "low", {"thinkingBudget": 1024, "includeThoughts": True}),
        ("models/gemini-2.5-flash-lite", True, "high", {"thinkingBudget": 24576, "includeThoughts": True}),
        ("gemini-2.5-pro", True, "none", {"thinkingBudget": 128, "includeThoughts": False}),  # its least
        ("gemini-3-pro-preview", True, "none", {"thinkingLevel": "MINIMAL", "includeThoughts": False}),
        ("gemini-3-flash", True, "medium", {"thinkingLevel": "MEDIUM", "includeThoughts": True}),
        ("gemini-3.5-flash", True, "xhigh", {"thinkingLevel": "HIGH", "includeThoughts": True}),
        ("gemini-flash-latest", True, "low", {"thinkingBudget": 1024, "includeThoughts": True}),  # an alias
        ("gemini-2.5-flash-image", False, "high", None),  # does not think: thinkingConfig would be a 400
        ("gemini-2.0-flash", False, "high", None),
        ("gemini-2.5-flash", None, "high", None),  # its entry could not be had: no risk of a 400
    ],
)
def test_reasoning_effort_becomes_the_models_kind_of_thinking_config(
    model: str, thinks: bool | None, effort: str, thinking: dict[str, Any] | None
) -> None:
    body = gemini.build_request(request(reasoning_effort=effort), model, thinks=thinks)
    assert body.get("generationConfig", {}).get("thinkingConfig") == thinking


def test_reasoning_effort_takes_the_names_the_ollama_translation_takes() -> None:
    assert gemini.request.LEVELS.keys() == gemini.request.BUDGETS.keys() == THINK.keys()
    with pytest.raises(InvalidRequest, match="unknown reasoning_effort 'bogus'") as refused:
        build(reasoning_effort="bogus")
    assert refused.value.param == "reasoning_effort"


def test_a_conversation_without_content_for_gemini_is_refused_naming_what_is_empty() -> None:
    system_only = [{"role": "system", "content": "Be brief."}]
    with pytest.raises(InvalidRequest, match="at least one user or assistant message") as refused:
        build(messages=system_only)
    assert refused.value.param == "messages"
    with pytest.raises(InvalidRequest, match="no empty message") as refused:
        build(messages=[*system_only, {"role": "user", "content": ""}])
    assert refused.value.param == "messages[1].content"


PATTERNED = ChatRequest.model_validate(
    {
        "model": "gemini-2.5-flash",
        "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "c", "schema": {"type": "string", "pattern": "^[A-Z]+$"}},
        },
    }
)


async def test_constraints_dropped_from_the_schema_are_named_in_a_notice_whole_and_streamed(
    httpx_mock: HTTPXMock, provider: GeminiProvider
) -> None:
    httpx_mock.add_response(
        method="POST",
        url=URL + "/models/gemini-2.5-flash:generateContent",
        json={"candidates": [candidate({"text": '"OSL"'})]},
    )
    completion = await provider.complete(PATTERNED, "gemini-2.5-flash")
    assert completion.notices == {"schema_dropped": "pattern"}
    httpx_mock.add_response(
        method="POST",
        url=URL + "/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        stream=httpx_stream([b'data: {"candidates":[{"content":{"parts":[{"text":"\\"OSL\\""}]}}]}\n\n']),
    )
    chunks = [chunk async for chunks in provider.stream(PATTERNED, "gemini-2.5-flash") for chunk in chunks]
    assert chunks[-1].notices == {"schema_dropped": "pattern"}
    httpx_mock.add_response(
        method="POST",
        url=URL + "/models/gemini-2.5-flash:generateContent",
        json={"candidates": [candidate({"text": "yo"})]},
    )
    assert (await provider.complete(CHAT, "gemini-2.5-flash")).notices == {}


def test_a_status_without_a_body_is_named_without_an_empty_reason() -> None:
    assert gemini.error_from(502, b"", "m").message == "Gemini answered 502"


def test_an_overloaded_model_is_busy_not_a_failure_of_gemini() -> None:
    """Gemini's 503 for a model under load says so; it is no reason to eject the backend."""
    overloaded = google_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
    error = gemini.error_from(503, overloaded, "gemini-2.5-flash")
    assert isinstance(error, UpstreamRejected) and (error.http_status, error.busy) == (503, True)
    down = gemini.error_from(
        503, google_error(503, "UNAVAILABLE", "The service is currently unavailable."), "m"
    )
    assert isinstance(down, UpstreamRejected) and not down.busy
