"""OpenAI chat requests as Gemini `generateContent` bodies (contracts/gemini.md §2, §9)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

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
from gateway.providers.gemini.schema import response_schema
from gateway.schemas import (
    AudioPart,
    ChatRequest,
    FilePart,
    ImagePart,
    Message,
    RefusalPart,
    TextPart,
    ToolCall,
)
from gateway.upstream import json_or_none

ROLES = {"user": "user", "assistant": "model", "tool": "user", "function": "user"}
RESULT_ROLES = ("tool", "function")  # messages that become functionResponse parts
# OpenAI field -> generationConfig key, for values that mean the same thing on both sides.
CONFIG = {
    "temperature": "temperature",
    "top_p": "topP",
    "n": "candidateCount",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
}
MODES = {"none": "NONE", "auto": "AUTO", "required": "ANY"}
# reasoning_effort -> thinkingConfig (contracts/gemini.md §9), for a model whose own entry says it
# thinks (for any other, thinkingConfig is a 400): Gemini 3 and later take a level, the others
# (2.5, aliases such as gemini-flash-latest) a budget in tokens (2.5 Pro cannot stop thinking: 128
# is its least). The names are those the Ollama translation takes.
LEVELS = {"none": "MINIMAL", "minimal": "MINIMAL", "low": "LOW", "medium": "MEDIUM", "high": "HIGH",
          "max": "HIGH", "xhigh": "HIGH", "ultra": "HIGH"}  # fmt: skip
BUDGETS = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576,
           "max": 24576, "xhigh": 24576, "ultra": 24576}  # fmt: skip
LEAST_BUDGET = {"gemini-2.5-pro": 128}
# What a tool-call id made here carries after `call_<random>`, each behind its marker (docstring).
SIGNATURE = "__ts__"
GEMINI_ID = "__id__"
INT32 = 2**31


def build_request(
    request: ChatRequest,
    model: str,
    *,
    images: Mapping[str, Image] = NO_IMAGES,
    thinks: bool | None = None,
) -> dict[str, Any]:
    """`images`: the request's http(s) image URLs, fetched (ImageFetcher.fetch); `thinks`: whether
    the model's entry (`GET /models/{model}`) says it thinks, None when that is not known."""
    body: dict[str, Any] = {"contents": _contents(request.messages, images)}
    system = [m.text() for m in request.messages if m.role in ("system", "developer") and m.text()]
    if system:
        body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    config = _generation_config(request)
    thinking = _thinking_config(request, model, thinks)
    if thinking is not None:
        config["thinkingConfig"] = thinking
    if config:
        body["generationConfig"] = config
    needs_tools(request)
    if request.tools:
        declarations = [
            _declaration(function_tool(tool, "Gemini", i).function) for i, tool in enumerate(request.tools)
        ]
        body["tools"] = [{"functionDeclarations": declarations}]
        if request.tool_choice is not None:
            names = {d["name"] for d in declarations}
            body["toolConfig"] = {"functionCallingConfig": _calling_config(request.tool_choice, names)}
    return body


def _contents(messages: list[Message], fetched: Mapping[str, Image]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for role, parts in _turns(messages, fetched):
        if not parts:
            continue
        if out and out[-1]["role"] == role:  # Gemini wants user and model turns to alternate
            out[-1]["parts"].extend(parts)
        else:
            out.append({"role": role, "parts": parts})
    if not out:  # Gemini refuses empty contents and empty parts (contracts/gemini.md §9)
        empty = [i for i, m in enumerate(messages) if m.role in ("user", "assistant")]
        if empty:
            raise InvalidRequest(
                "Gemini takes no empty message, and needs at least one user or assistant message with"
                " content",
                param=f"messages[{empty[-1]}].content",
            )
        raise InvalidRequest("Gemini needs at least one user or assistant message", param="messages")
    return out


def _turns(
    messages: list[Message], fetched: Mapping[str, Image]
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(Gemini role, parts) per message, except that a run of tool results is one turn."""
    results: list[int] = []  # the run of tool results under way, by message index
    for i, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:  # system and developer text went to systemInstruction
            continue
        if message.role in RESULT_ROLES:
            results.append(i)
            continue
        if results:
            yield "user", _function_responses(messages, results)
            results = []
        parts = _parts(message, i, fetched)
        parts += [
            _function_call(function_call(call, "Gemini", i, j), i, j)
            for j, call in enumerate(message.tool_calls or ())
        ]
        yield role, parts
    if results:
        yield "user", _function_responses(messages, results)


def _function_responses(messages: list[Message], results: list[int]) -> list[dict[str, Any]]:
    """A run of tool results in the order of the calls they answer, as Gemini pairs them: two calls
    to one function are told apart by position only. Results that answer no call of the turn
    before keep their order, after the others."""
    order = {call.id: n for n, call in enumerate(_turn_calls(messages[: results[0]]))}
    ranked = sorted(results, key=lambda i: order.get(messages[i].tool_call_id or "", len(order)))
    return [_function_response(messages[i], messages[:i], i) for i in ranked]


def _turn_calls(history: list[Message]) -> list[ToolCall]:
    """The tool calls of the model turn that ends `history` (its assistant messages merge into one)."""
    calls: list[ToolCall] = []
    for message in reversed(history):
        if message.role == "assistant":
            calls[:0] = [call for call in message.tool_calls or () if isinstance(call, ToolCall)]
        elif message.role not in ("system", "developer"):
            break
    return calls


def _parts(message: Message, i: int, fetched: Mapping[str, Image]) -> list[dict[str, Any]]:
    """A user or assistant message's content, part by part and in order (a caption stays next to
    its picture); empty text is left out, and a part Gemini cannot be given is a 400."""
    if not isinstance(message.content, list):
        return [{"text": message.content}] if message.content else []
    parts = []
    for j, part in enumerate(message.content):
        field = f"messages[{i}].content[{j}]"
        if isinstance(part, TextPart | RefusalPart):
            text = part.text if isinstance(part, TextPart) else part.refusal
            parts += [{"text": text}] if text else []
        elif isinstance(part, ImagePart):
            parts.append(_image(part.url, f"{field}.{part.url_field}", fetched))
        elif isinstance(part, AudioPart):
            parts.append(_inline(*audio_data(part.input_audio, field + ".input_audio")))
        elif isinstance(part, FilePart):
            parts.append(_file(part.file, field + ".file"))
        else:  # a kind of part this translation does not know: never dropped without a word
            raise InvalidRequest(f"Gemini backends cannot take {part.type!r} parts", param=field)
    return parts


def _image(url: str, param: str, fetched: Mapping[str, Image]) -> dict[str, Any]:
    if url in fetched:
        return {"inlineData": {"mimeType": fetched[url].mime, "data": fetched[url].data}}
    if not url.startswith("data:"):
        raise InvalidRequest(
            "Gemini backends need images inline: send a base64 data URL (data:image/png;base64,...)",
            param=param,
        )
    mime, data = data_url(url, "an image data URL", param)
    return _inline(mime or "image/png", data)


def _file(file: dict[str, Any], param: str) -> dict[str, Any]:
    if "file_data" not in file:  # a file_id names an upload at OpenAI, which Gemini cannot read
        raise InvalidRequest(
            "Gemini backends need a file's content: send it as file_data, a base64 data URL"
            " (data:application/pdf;base64,...); file_id uploads are OpenAI's",
            param=param,
        )
    url, field = file["file_data"], param + ".file_data"
    if not isinstance(url, str) or not url.startswith("data:"):
        raise InvalidRequest(
            "file_data must be a base64 data URL (data:application/pdf;base64,...)", param=field
        )
    mime, data = data_url(url, "file_data", field)
    if not mime:
        raise InvalidRequest(
            "file_data must name its MIME type (data:application/pdf;base64,...)", param=field
        )
    return _inline(mime, data)


def _inline(mime: str, data: str) -> dict[str, Any]:
    return {"inlineData": {"mimeType": mime, "data": data}}


def _function_call(call: ToolCall, i: int, j: int) -> dict[str, Any]:
    args = json_or_none((call.function.arguments or "{}").encode())
    if not isinstance(args, dict):
        raise InvalidRequest(
            "tool call arguments must be a JSON object",
            param=f"messages[{i}].tool_calls[{j}].function.arguments",
        )
    signature, native = _carried(call.id)
    part: dict[str, Any] = {"functionCall": _with_id(native, name=call.function.name, args=args)}
    if signature:
        part["thoughtSignature"] = signature
    return part


def _function_response(message: Message, history: list[Message], i: int) -> dict[str, Any]:
    name = tool_name(history, message.tool_call_id) or message.name
    if not name:
        raise InvalidRequest(
            "this tool result answers no earlier assistant tool call; Gemini needs the function's name",
            param=f"messages[{i}].tool_call_id",
        )
    text = message.text()
    parsed = json_or_none(text.encode())
    response = parsed if isinstance(parsed, dict) else {"result": text if parsed is None else parsed}
    _, native = _carried(message.tool_call_id)
    return {"functionResponse": _with_id(native, name=name, response=response)}


def _with_id(native: str, **fields: Any) -> dict[str, Any]:
    """A functionCall or functionResponse, with Gemini's own call id when there is one."""
    return {"id": native, **fields} if native else fields


def _carried(call_id: str | None) -> tuple[str, str]:
    """(thought signature, Gemini's call id) that a tool-call id made here carries; "" when absent."""
    head, _, native = (call_id or "").partition(GEMINI_ID)
    _, _, signature = head.partition(SIGNATURE)
    return signature, native


def _generation_config(request: ChatRequest) -> dict[str, Any]:
    config = present(request, CONFIG)
    if request.max_output_tokens is not None:
        config["maxOutputTokens"] = request.max_output_tokens
    if request.stop_list is not None:
        if len(request.stop_list) > 5:
            raise InvalidRequest("Gemini accepts at most 5 stop sequences", param="stop")
        config["stopSequences"] = request.stop_list
    if request.seed is not None:
        if not -INT32 <= request.seed < INT32:
            raise InvalidRequest("Gemini seeds must fit in 32 bits", param="seed")
        config["seed"] = request.seed
    if (alternatives := request.alternatives) is not None:
        config["responseLogprobs"] = True
        if alternatives:
            config["logprobs"] = alternatives
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        config["responseMimeType"] = "application/json"
        if (schema := json_schema(request)) is not None:
            config["responseJsonSchema"] = response_schema(schema)[0]
    return config


def _thinking_config(request: ChatRequest, model: str, thinks: bool | None) -> dict[str, Any] | None:
    """None for a model not known to think: better no thinking than a 400."""
    effort = request.reasoning_effort
    if effort is None:
        return None
    if effort not in LEVELS:
        raise InvalidRequest(f"unknown reasoning_effort {effort!r}", param="reasoning_effort")
    if not thinks:
        return None
    name = model.removeprefix("models/")
    thoughts = {"includeThoughts": effort != "none"}  # they come back as reasoning_content
    version = re.match(r"gemini-(\d+)", name)
    if version is not None and int(version[1]) >= 3:
        return {"thinkingLevel": LEVELS[effort], **thoughts}
    least = next((v for prefix, v in LEAST_BUDGET.items() if name.startswith(prefix)), 0)
    return {"thinkingBudget": max(BUDGETS[effort], least), **thoughts}


def needs_thinking(request: ChatRequest) -> bool:
    """Whether build_request's answer depends on whether the model thinks: reasoning_effort does."""
    return request.reasoning_effort is not None


def json_schema(request: ChatRequest) -> dict[str, Any] | None:
    """The schema of a `json_schema` response_format, when one is given."""
    response_format = request.response_format
    if response_format is None or response_format.type != "json_schema" or not response_format.json_schema:
        return None
    return response_format.json_schema.schema_ or None


def _declaration(function: Any) -> dict[str, Any]:
    fields = {"name": function.name, "description": function.description}
    fields["parametersJsonSchema"] = function.parameters
    return {key: value for key, value in fields.items() if value is not None}


def _calling_config(choice: str | dict[str, Any], names: set[str]) -> dict[str, Any]:
    if isinstance(choice, str):
        return {"mode": MODES[choice]}
    required, chosen = chosen_functions(choice, names, "Gemini")
    # VALIDATED: the model may call one of them, or answer
    return {"mode": "ANY" if required else "VALIDATED", "allowedFunctionNames": chosen}
