"""OpenAI chat requests as Ollama `/api/chat` bodies (contracts/ollama.md §2, §8)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.images import NO_IMAGES, Image
from gateway.providers.base import (
    audio_data,
    chosen_functions,
    data_url,
    function_call,
    function_tool,
    needs_tools,
    present,
    tool_name,
)
from gateway.schemas import AudioPart, ChatRequest, FilePart, ImagePart, Message, ToolCall

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# OpenAI field -> Ollama option, for values that mean the same thing on both sides.
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
THINK = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
         "max": "max", "xhigh": "max", "ultra": "max"}  # fmt: skip
EXTENSIONS = ("keep_alive", "think")


def build_request(
    request: ChatRequest,
    model: str,
    *,
    stream: bool,
    images: Mapping[str, Image] = NO_IMAGES,
    capabilities: frozenset[str] | None = None,
) -> dict[str, Any]:
    """`images`: the request's http(s) image URLs, fetched (ImageFetcher.fetch); `capabilities`: the
    model's, from /api/show (None: not known)."""
    if request.n is not None and request.n > 1:
        raise InvalidRequest("Ollama backends return one choice; 'n' must be 1", param="n")
    body: dict[str, Any] = {
        "model": model,
        "messages": _messages(request.messages, images),
        "stream": stream,
    }
    options = _options(request)
    if options:
        body["options"] = options
    fmt = _format(request)
    if fmt is not None:
        body["format"] = fmt
    tools = _tools(request)
    if tools:
        body["tools"] = tools
    if (alternatives := request.alternatives) is not None:  # the same fields and shape as OpenAI's
        body["logprobs"] = True
        if alternatives:
            body["top_logprobs"] = alternatives
    extra = request.model_extra or {}
    for key in EXTENSIONS:
        if key in extra:
            body[key] = extra[key]
    effort = request.reasoning_effort
    if effort is not None and "think" not in body:
        if effort not in THINK:
            raise InvalidRequest(f"unknown reasoning_effort {effort!r}", param="reasoning_effort")
        # Ollama answers 400 to `think` for a model without the capability (contracts/ollama.md 8.8)
        if capabilities is None or "thinking" in capabilities:
            body["think"] = THINK[effort]
    return body


def needs_capabilities(request: ChatRequest) -> bool:
    """Whether build_request's answer depends on the model's capabilities: reasoning_effort does."""
    return request.reasoning_effort is not None and "think" not in (request.model_extra or {})


def _messages(messages: list[Message], fetched: Mapping[str, Image]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.role, "tool")  # legacy `function` results are tool results
        native: dict[str, Any] = {"role": role, "content": message.text()}
        images = _media(message, i, fetched)
        if images:
            native["images"] = images
        if message.tool_calls:
            native["tool_calls"] = [
                _tool_call(function_call(call, "Ollama", i, j), i, j)
                for j, call in enumerate(message.tool_calls)
            ]
        extra = message.model_extra or {}
        reasoning = extra.get("reasoning_content") or extra.get("reasoning")
        if role == "assistant" and isinstance(reasoning, str):
            native["thinking"] = reasoning
        if role == "tool":
            name = message.name or tool_name(messages[:i], message.tool_call_id)
            if name is None:
                # No placeholder name (contracts/openai.md 9.6 allows either): the model would read a
                # result of a function never called; OpenAI itself refuses such a history with 400.
                raise InvalidRequest(
                    "tool message answers no earlier assistant tool call: its tool_call_id matches"
                    " none (Ollama needs the function's name)",
                    param=f"messages[{i}].tool_call_id",
                )
            native["tool_name"] = name
            if message.tool_call_id:
                native["tool_call_id"] = message.tool_call_id
        out.append(native)
    return out


def _media(message: Message, i: int, fetched: Mapping[str, Image]) -> list[str]:
    """The message's images and audio clips as bare base64, in the order of its parts: Ollama takes
    audio bytes in `images` too (contracts/ollama.md 2.2, 7.1). A part it has no field for is
    refused, never dropped."""
    if not isinstance(message.content, list):
        return []
    media = []
    for j, part in enumerate(message.content):
        if isinstance(part, ImagePart):
            media.append(_image(part.url, f"messages[{i}].content[{j}].{part.url_field}", fetched))
        elif isinstance(part, AudioPart):
            media.append(audio_data(part.input_audio, f"messages[{i}].content[{j}].input_audio")[1])
        elif isinstance(part, FilePart):
            raise InvalidRequest(
                "Ollama backends cannot take file parts; send the file's text as a text part",
                param=f"messages[{i}].content[{j}]",
            )
    return media


def _image(url: str, param: str, fetched: Mapping[str, Image]) -> str:
    if url in fetched:
        return fetched[url].data
    if not url.startswith("data:"):
        raise InvalidRequest(
            "Ollama backends need images inline: send a base64 data URL (data:image/png;base64,...)",
            param=param,
        )
    return data_url(url, "an image data URL", param)[1]


def _tool_call(call: ToolCall, i: int, j: int) -> dict[str, Any]:
    arguments = call.function.arguments or "{}"
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):  # Ollama decodes arguments into an object, nothing else
        raise InvalidRequest(
            "tool call arguments must be a JSON object",
            param=f"messages[{i}].tool_calls[{j}].function.arguments",
        )
    return {"id": call.id, "function": {"name": call.function.name, "arguments": parsed}}


def _options(request: ChatRequest) -> dict[str, Any]:
    extra = request.model_extra or {}
    supplied = extra.get("options")
    options: dict[str, Any] = dict(supplied) if isinstance(supplied, dict) else {}
    options.update(present(request, OPTIONS))
    if request.max_output_tokens is not None:
        options["num_predict"] = request.max_output_tokens
    if request.stop_list is not None:
        options["stop"] = request.stop_list
    return options


def _format(request: ChatRequest) -> str | dict[str, Any] | None:
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_schema" and response_format.json_schema is not None:
        return response_format.json_schema.schema_ or "json"
    return "json"


def _tools(request: ChatRequest) -> list[dict[str, Any]]:
    needs_tools(request)
    if not request.tools or request.tool_choice == "none":
        return []
    tools = [
        function_tool(tool, "Ollama", i).model_dump(exclude_none=True) for i, tool in enumerate(request.tools)
    ]
    if not isinstance(request.tool_choice, dict):  # "auto", "required": Ollama cannot force a call
        return tools
    # A named function or `allowed_tools` (either mode) sends only those tools.
    _, allowed = chosen_functions(request.tool_choice, {tool["function"]["name"] for tool in tools}, "Ollama")
    return [tool for tool in tools if tool["function"]["name"] in allowed]
