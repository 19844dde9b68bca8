"""The OpenAI <-> Ollama native translation, both ways, including contracts/ollama.md's odd cases."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import InvalidRequest, ModelNotFound, UpstreamProtocol, UpstreamRejected
from gateway.providers import ollama
from gateway.schemas import ChatRequest


def request(**fields: Any) -> ChatRequest:
    fields.setdefault("model", "llama3.2")
    fields.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return ChatRequest.model_validate(fields)


def build(**fields: Any) -> dict[str, Any]:
    return ollama.build_request(request(**fields), "llama3.2:latest", stream=False)


def test_stream_flag_is_always_explicit() -> None:
    assert build()["stream"] is False
    assert ollama.build_request(request(), "m", stream=True)["stream"] is True


def test_upstream_model_name_replaces_the_client_name() -> None:
    assert build(model="default")["model"] == "llama3.2:latest"


@pytest.mark.parametrize(
    ("role", "native"),
    [("system", "system"), ("developer", "system"), ("user", "user"), ("assistant", "assistant")],
)
def test_roles_map_to_native_roles(role: str, native: str) -> None:
    body = build(messages=[{"role": role, "content": "x"}])
    assert body["messages"] == [{"role": native, "content": "x"}]


def test_text_parts_are_joined_with_newlines_into_one_message() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert build(messages=[{"role": "user", "content": parts}])["messages"] == [
        {"role": "user", "content": "first\nsecond"}
    ]


def test_image_data_urls_become_bare_base64_images() -> None:
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": "data:image/jpeg;base64,/9j/4AAQ"},
    ]
    message = build(messages=[{"role": "user", "content": parts}])["messages"][0]
    assert message == {"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo=", "/9j/4AAQ"]}


def test_http_image_urls_are_refused_with_the_field_named() -> None:
    parts = [{"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}]
    with pytest.raises(InvalidRequest) as caught:
        build(messages=[{"role": "user", "content": parts}])
    assert caught.value.param == "messages[0].content[0].image_url.url"
    assert "base64 data URL" in caught.value.message
    short = [{"type": "image_url", "image_url": "https://example.org/cat.png"}]  # the non-spec short form
    with pytest.raises(InvalidRequest) as caught:
        build(messages=[{"role": "user", "content": short}])
    assert caught.value.param == "messages[0].content[0].image_url"


def test_broken_base64_image_is_refused() -> None:
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]
    with pytest.raises(InvalidRequest, match="not valid base64"):
        build(messages=[{"role": "user", "content": parts}])


WAV = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA="


def test_input_audio_goes_to_images_as_base64_in_the_order_of_the_parts() -> None:
    parts = [
        {"type": "text", "text": "What do you see and hear?"},
        {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "input_audio", "input_audio": {"data": "SUQzBAA=", "format": "mp3"}},
    ]
    message = build(messages=[{"role": "user", "content": parts}])["messages"][0]
    assert message == {
        "role": "user",
        "content": "What do you see and hear?",
        "images": [WAV, "iVBORw0KGgo=", "SUQzBAA="],
    }


@pytest.mark.parametrize(
    ("audio", "param", "fragment"),
    [
        ({"data": WAV, "format": "flac"}, "messages[0].content[1].input_audio.format", "'wav' or 'mp3'"),
        ({"data": WAV}, "messages[0].content[1].input_audio.format", "'wav' or 'mp3'"),
        ({"data": "@@@", "format": "wav"}, "messages[0].content[1].input_audio.data", "not valid base64"),
        (
            {"data": "data:audio/wav;base64," + WAV, "format": "wav"},
            "messages[0].content[1].input_audio.data",
            "not valid base64",
        ),
        ({"format": "wav"}, "messages[0].content[1].input_audio.data", "base64 string"),
        ({"data": 7, "format": "wav"}, "messages[0].content[1].input_audio.data", "base64 string"),
    ],
    ids=["unknown-format", "no-format", "broken-base64", "data-url", "no-data", "data-not-a-string"],
)
def test_unusable_input_audio_is_refused_naming_the_field(
    audio: dict[str, Any], param: str, fragment: str
) -> None:
    parts = [{"type": "text", "text": "Transcribe."}, {"type": "input_audio", "input_audio": audio}]
    with pytest.raises(InvalidRequest) as caught:
        build(messages=[{"role": "user", "content": parts}])
    assert caught.value.param == param
    assert fragment in caught.value.message


def test_a_file_part_is_refused_naming_the_part() -> None:
    parts = [
        {"type": "text", "text": "Summarise the attached PDF."},
        {
            "type": "file",
            "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"},
        },
    ]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    with pytest.raises(InvalidRequest) as caught:
        build(messages=history)
    assert caught.value.param == "messages[1].content[1]"
    assert "file parts" in caught.value.message


def test_sampling_parameters_map_to_options_by_meaning() -> None:
    options = build(
        temperature=0.2,
        top_p=0.9,
        max_tokens=50,
        seed=7,
        stop="END",
        presence_penalty=0.5,
        frequency_penalty=-0.5,
    )["options"]
    assert options == {
        "temperature": 0.2,
        "top_p": 0.9,
        "num_predict": 50,
        "seed": 7,
        "stop": ["END"],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
    }


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert build(max_tokens=10, max_completion_tokens=20)["options"]["num_predict"] == 20


def test_unset_sampling_leaves_the_modelfile_defaults_alone() -> None:
    assert "options" not in build()


def test_client_supplied_options_are_kept_under_the_mapped_ones() -> None:
    options = build(options={"num_ctx": 8192, "temperature": 1.5}, temperature=0.1)["options"]
    assert options == {"num_ctx": 8192, "temperature": 0.1}


def test_json_object_becomes_format_json() -> None:
    assert build(response_format={"type": "json_object"})["format"] == "json"


def test_json_schema_becomes_the_schema_object() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert build(response_format=fmt)["format"] == schema


def test_text_format_sends_no_format() -> None:
    assert "format" not in build(response_format={"type": "text"})


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
OTHER = {"type": "function", "function": {"name": "get_time"}}


def test_tools_pass_through_in_the_same_envelope() -> None:
    assert build(tools=[TOOL])["tools"] == [TOOL]


def test_tool_choice_none_drops_the_tools() -> None:
    assert "tools" not in build(tools=[TOOL], tool_choice="none")


def test_tool_choice_naming_a_function_keeps_only_that_tool() -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    assert build(tools=[TOOL, OTHER], tool_choice=choice)["tools"] == [OTHER]


def test_tool_choice_naming_an_unknown_function_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        build(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert caught.value.param == "tool_choice"


DELETE = {"type": "function", "function": {"name": "delete_account"}}


def allowed(mode: str, *names: str) -> dict[str, Any]:
    tools = [{"type": "function", "function": {"name": name}} for name in names]
    return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": tools}}


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_allowed_tools_sends_only_the_tools_it_lists(mode: str) -> None:
    body = build(tools=[TOOL, DELETE, OTHER], tool_choice=allowed(mode, "get_time", "get_weather"))
    assert body["tools"] == [TOOL, OTHER]


def test_allowed_tools_naming_a_function_the_request_lacks_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        build(tools=[TOOL, OTHER], tool_choice=allowed("auto", "get_weather", "delete_account"))
    assert caught.value.param == "tool_choice"
    assert "'delete_account'" in caught.value.message


@pytest.mark.parametrize(
    "choice",
    [
        allowed("auto"),
        allowed("sometimes", "get_weather"),
        {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function"}]}},
        {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": "get_weather"}},
        {"type": "allowed_tools"},
        {"type": "function", "function": {}},
        {"type": "custom", "custom": {"name": "get_weather"}},
        {"function": {"name": "get_weather"}},
    ],
    ids=[
        "no-tools-listed",
        "unknown-mode",
        "entry-without-name",
        "tools-not-a-list",
        "no-allowed-tools",
        "function-without-name",
        "custom",
        "no-type",
    ],
)
def test_a_tool_choice_object_ollama_cannot_honour_is_refused(choice: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        build(tools=[TOOL, DELETE], tool_choice=choice)
    assert caught.value.param == "tool_choice"


CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
            },
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "4C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
]


def test_assistant_tool_calls_get_object_arguments() -> None:
    assistant = build(messages=CONVERSATION)["messages"][1]
    assert assistant == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_a", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"id": "call_b", "function": {"name": "get_time", "arguments": {}}},
        ],
    }


def test_tool_results_are_linked_by_name_and_id_in_order() -> None:
    results = build(messages=CONVERSATION)["messages"][2:]
    assert results == [
        {"role": "tool", "content": "4C", "tool_name": "get_weather", "tool_call_id": "call_a"},
        {"role": "tool", "content": "noon", "tool_name": "get_time", "tool_call_id": "call_b"},
    ]


def test_a_tool_result_answering_no_earlier_call_is_refused_naming_its_id_unless_it_has_a_name() -> None:
    trimmed = [
        CONVERSATION[0],
        CONVERSATION[1],
        {"role": "tool", "tool_call_id": "call_a", "content": "4C"},
        {"role": "tool", "tool_call_id": "call_trimmed_history", "content": "4C, light snow"},
    ]
    with pytest.raises(InvalidRequest) as caught:
        build(messages=trimmed)
    assert caught.value.param == "messages[3].tool_call_id"
    named = dict(trimmed[3], name="get_weather")
    assert build(messages=[*trimmed[:3], named])["messages"][3] == {
        "role": "tool",
        "content": "4C, light snow",
        "tool_name": "get_weather",
        "tool_call_id": "call_trimmed_history",
    }


def test_a_tool_result_is_not_linked_to_a_call_that_comes_after_it() -> None:
    early = [CONVERSATION[0], {"role": "tool", "tool_call_id": "call_a", "content": "4C"}, CONVERSATION[1]]
    with pytest.raises(InvalidRequest) as caught:
        build(messages=early)
    assert caught.value.param == "messages[1].tool_call_id"


@pytest.mark.parametrize(
    "arguments",
    ["{oops", "[1, 2]", '"Oslo"', "3", "null", "true"],
    ids=["not-json", "array", "string", "number", "null", "boolean"],
)
def test_tool_call_arguments_that_are_not_a_json_object_name_the_field(arguments: str) -> None:
    broken = [
        dict(
            CONVERSATION[1],
            tool_calls=[
                CONVERSATION[1]["tool_calls"][0],
                dict(CONVERSATION[1]["tool_calls"][0], function={"name": "f", "arguments": arguments}),
            ],
        )
    ]
    with pytest.raises(InvalidRequest) as caught:
        build(messages=[CONVERSATION[0], *broken])
    assert caught.value.param == "messages[1].tool_calls[1].function.arguments"
    assert caught.value.message == "tool call arguments must be a JSON object"


def test_n_above_one_is_refused_naming_n() -> None:
    with pytest.raises(InvalidRequest) as caught:
        build(n=2)
    assert caught.value.param == "n"


def test_reasoning_effort_maps_to_think() -> None:
    assert build(reasoning_effort="minimal")["think"] == "low"
    assert build(reasoning_effort="none")["think"] is False


def test_keep_alive_is_top_level() -> None:
    body = build(keep_alive="10m")
    assert body["keep_alive"] == "10m"
    assert "keep_alive" not in body.get("options", {})


# ---- responses ----

FINAL = {"done": True, "done_reason": "stop", "prompt_eval_count": 26, "eval_count": 5}


def test_response_maps_content_usage_and_finish() -> None:
    completion = ollama.parse_response({"message": {"role": "assistant", "content": "Hello"}, **FINAL})
    assert completion.choices[0].content == "Hello"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.as_dict() == {"prompt_tokens": 26, "completion_tokens": 5, "total_tokens": 31}


def test_missing_counts_are_zero() -> None:
    completion = ollama.parse_response({"message": {"content": "x"}, "done": True})
    assert completion.usage.as_dict() == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize(
    ("done_reason", "expected"),
    [("length", "length"), ("stop", "stop"), ("load", "stop"), (None, "stop"), ("", "stop")],
)
def test_done_reason_maps_to_the_openai_set(done_reason: str | None, expected: str) -> None:
    completion = ollama.parse_response(
        {"message": {"content": "x"}, "done": True, "done_reason": done_reason}
    )
    assert completion.choices[0].finish_reason == expected


def test_tool_calls_become_openai_calls_with_string_arguments_and_finish_tool_calls() -> None:
    message = {
        "content": "",
        "tool_calls": [
            {
                "id": "call_q1w2e3r4",
                "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Oslo"}},
            },
            {"function": {"name": "get_time", "arguments": {}}},
        ],
    }
    choice = ollama.parse_response({"message": message, **FINAL}).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.content is None
    first, second = choice.tool_calls
    assert (first.index, first.id, first.name) == (0, "call_q1w2e3r4", "get_weather")
    assert orjson.loads(first.arguments) == {"city": "Oslo"}
    assert second.index == 1
    assert second.id is not None and second.id.startswith("call_") and len(second.id) > 10
    assert second.arguments == "{}"


def test_thinking_is_kept_apart_from_content() -> None:
    choice = ollama.parse_response({"message": {"content": "4", "thinking": "2+2"}, **FINAL}).choices[0]
    assert (choice.content, choice.reasoning) == ("4", "2+2")


def test_a_reply_without_done_is_reported_incomplete() -> None:
    with pytest.raises(UpstreamProtocol) as caught:
        ollama.parse_response({"message": {"content": "twotwo"}, "done": False})
    assert caught.value.code == "upstream_incomplete"


def test_stream_lines_become_chunks() -> None:
    state = ollama.StreamState()
    chunks = [
        *state.parse_chunk({"message": {"role": "assistant", "content": "Hel"}, "done": False}),
        *state.parse_chunk(
            {"message": {"role": "assistant", "thinking": "hmm", "content": "lo"}, "done": False}
        ),
        *state.parse_chunk({"message": {"content": ""}, **FINAL}),
    ]
    assert [c.content for c in chunks] == ["Hel", "", "lo", ""]
    assert chunks[1].reasoning == "hmm"
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 31
    assert state.done


def test_final_line_with_text_still_appends_it() -> None:
    chunks = ollama.StreamState().parse_chunk({"message": {"content": "!"}, **FINAL})
    assert [c.content for c in chunks] == ["!", ""]


def test_streamed_tool_calls_get_dense_indexes_and_finish_tool_calls() -> None:
    state = ollama.StreamState()
    call = {"function": {"name": "f", "arguments": {"a": 1}}}
    first = state.parse_chunk({"message": {"content": "", "tool_calls": [call]}, "done": False})
    second = state.parse_chunk({"message": {"content": "", "tool_calls": [call, call]}, "done": False})
    final = state.parse_chunk({"message": {"content": ""}, **FINAL})
    assert [c.index for chunk in first + second for c in chunk.tool_calls] == [0, 1, 2]
    assert final[-1].finish_reason == "tool_calls"


def test_an_error_line_mid_stream_raises() -> None:
    with pytest.raises(UpstreamRejected, match="error was encountered"):
        ollama.StreamState().parse_chunk({"error": "an error was encountered while running the model"})


def test_404_says_to_pull_the_model() -> None:
    error = ollama.error_from(404, b'{"error":"model \\"x\\" not found, try pulling it first"}', "x")
    assert isinstance(error, ModelNotFound)
    assert "ollama pull x" in error.message
    assert error.http_status == 404
    assert error.retryable  # another instance of the pool may have it


def test_400_keeps_ollamas_reason_and_names_the_param() -> None:
    error = ollama.error_from(
        400, b'{"error":"registry.ollama.ai/library/gemma:2b does not support tools"}', "m"
    )
    assert isinstance(error, InvalidRequest)
    assert error.param == "tools"
    assert "does not support tools" in error.message


def test_503_busy_is_retryable_with_retry_after() -> None:
    error = ollama.error_from(503, b'{"error":"server busy, please try again."}', "m")
    assert error.retryable
    assert error.http_status == 503
    assert error.headers["retry-after"] == "1"


def test_tags_entries_become_model_info_with_cloud_flag() -> None:
    local = ollama.model_info(
        {"name": "llama3.2:latest", "modified_at": "2025-05-04T17:37:44.706015396-07:00"}
    )
    cloud = ollama.model_info({"name": "gpt-oss:120b", "remote_host": "https://ollama.com:443"})
    named = ollama.model_info({"name": "qwen3-coder:480b-cloud"})
    assert (local.id, local.owned_by, local.remote) == ("llama3.2:latest", "library", False)
    assert local.created == 1746405464
    assert cloud.remote and named.remote
    assert ollama.model_info({"name": "hf.co/user/repo:Q4"}).owned_by == "hf.co/user"


def test_log_probabilities_are_asked_for_and_come_back_as_openais_entries() -> None:
    assert "logprobs" not in build()
    assert (build(logprobs=True)["logprobs"], "top_logprobs" in build(logprobs=True)) == (True, False)
    assert build(logprobs=True, top_logprobs=3)["top_logprobs"] == 3
    entry = {
        "token": "Hi",
        "logprob": -0.25,
        "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.25}],
    }
    whole = ollama.parse_response({"message": {"content": "Hi"}, "logprobs": [entry], **FINAL})
    assert whole.choices[0].logprobs == [entry]
    assert ollama.parse_response({"message": {"content": "Hi"}, **FINAL}).choices[0].logprobs is None
    [chunk] = ollama.StreamState().parse_chunk(
        {"message": {"content": "Hi"}, "logprobs": [entry], "done": False}
    )
    assert (chunk.content, chunk.logprobs) == ("Hi", [entry])


def test_a_status_without_a_body_is_named_without_an_empty_reason() -> None:
    assert ollama.error_from(204, b"", "m").message == "Ollama answered 204"
    assert (
        ollama.error_from(502, b'{"error":"upstream gone"}', "m").message
        == "Ollama answered 502: upstream gone"
    )
