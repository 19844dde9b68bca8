"""What every provider that translates requests shares (gateway/providers/base.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.providers import gemini, ollama
from gateway.schemas import ChatRequest

FUNCTION = {"type": "function", "function": {"name": "f"}}
CUSTOM_TOOL = {"type": "custom", "custom": {"name": "grep"}}
CUSTOM_CALL = {"id": "call_c1", "type": "custom", "custom": {"name": "grep", "input": "foo"}}
TRANSLATIONS: dict[str, Callable[[ChatRequest], Any]] = {
    "ollama": lambda request: ollama.build_request(request, "llama3.2", stream=False),
    "gemini": lambda request: gemini.build_request(request, "gemini-2.5-flash"),
}


@pytest.mark.parametrize("backend", TRANSLATIONS)
def test_custom_tools_and_their_calls_are_refused_naming_them(backend: str) -> None:
    translate = TRANSLATIONS[backend]
    hi = {"role": "user", "content": "Hi"}
    with pytest.raises(InvalidRequest) as refused:
        translate(
            ChatRequest.model_validate({"model": "m", "messages": [hi], "tools": [FUNCTION, CUSTOM_TOOL]})
        )
    assert (refused.value.param, "custom tools are OpenAI's" in refused.value.message) == ("tools[1]", True)
    history = [hi, {"role": "assistant", "content": None, "tool_calls": [CUSTOM_CALL]}]
    with pytest.raises(InvalidRequest) as refused:
        translate(ChatRequest.model_validate({"model": "m", "messages": history}))
    assert refused.value.param == "messages[1].tool_calls[0]"


@pytest.mark.parametrize("backend", TRANSLATIONS)
@pytest.mark.parametrize("tools", [None, []])
@pytest.mark.parametrize(
    "choice",
    [
        "required",
        {"type": "function", "function": {"name": "f"}},
        {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [FUNCTION]}},
    ],
    ids=["required", "named", "allowed_tools"],
)
def test_a_tool_choice_asking_for_a_call_without_tools_is_refused(
    backend: str, choice: Any, tools: list[Any] | None
) -> None:
    def translate(tool_choice: Any) -> Any:
        fields = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "tools": tools}
        return TRANSLATIONS[backend](ChatRequest.model_validate({**fields, "tool_choice": tool_choice}))

    with pytest.raises(InvalidRequest, match="only allowed when 'tools' are specified") as caught:
        translate(choice)
    assert caught.value.param == "tool_choice"
    assert "tools" not in translate("none")
    assert "tools" not in translate("auto")
