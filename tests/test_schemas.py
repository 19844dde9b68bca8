"""The OpenAI wire models: what they accept and what they read for the PII detector."""

from __future__ import annotations

import pytest

from gateway.body import validate
from gateway.errors import InvalidRequest
from gateway.schemas import ChatRequest


def test_the_detector_reads_function_arguments_and_custom_tool_input() -> None:
    request = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "find it"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "a", "function": {"name": "f", "arguments": '{"to": "ana@example.org"}'}},
                        {
                            "id": "b",
                            "type": "custom",
                            "custom": {"name": "grep", "input": "4111 1111 1111 1111"},
                        },
                    ],
                },
            ],
        }
    )
    assert list(request.texts()) == ["find it", "", '{"to": "ana@example.org"}', "4111 1111 1111 1111"]
    assert request.messages[1].tool_calls is not None
    assert [call.type for call in request.messages[1].tool_calls] == [
        "function",
        "custom",
    ]  # type may be left out


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool"])
def test_content_as_an_empty_list_of_parts_is_refused_naming_it(role: str) -> None:
    message = {"role": role, "content": [], "tool_call_id": "call_1"}
    with pytest.raises(InvalidRequest) as refused:
        validate(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}, message]})
    assert refused.value.param == "messages[1].content"
    assert "at least one part" in refused.value.message
