"""Gemini's native API (`generateContent`, SSE streams, `batchEmbedContents`) behind the OpenAI surface.

Translation choices (contracts/gemini.md §9-§11):
- system/developer messages become `systemInstruction` (one text part each, in order); a run of tool
  results becomes `functionResponse` parts of one `user` turn, in the order of the calls they answer
  (Gemini pairs a result with its call by position), results for no call of that turn after them;
  adjacent same-role turns are merged so roles alternate; empty text is never sent. Only system text
  and nothing else is refused (400, messages).
- Content parts map one by one, in their order: text, images, `input_audio` (wav, mp3) and a
  `file`'s `file_data` (a base64 data URL) become `text` and `inlineData` parts. A part Gemini cannot
  be given (a `file_id` upload, another audio format, bad base64) is a 400 naming it, never dropped.
- The API key travels in `x-goog-api-key`, never in the URL (query strings end up in logs).
- Tool-call ids are made here: `call_<random>[__ts__<signature>][__id__<Gemini's id>]`. A call's
  `thoughtSignature` goes back on its `functionCall` part when the id returns; Gemini's own
  `functionCall.id` (usually absent) goes back as `id` on that part and on the `functionResponse`
  answering it. The random part keeps ids unique when Gemini's repeat across turns. Markers are
  read left to right: the random part is letters and digits and a signature is standard base64,
  so neither holds a `_`, and Gemini's id, last, may hold anything. Ids without `__id__` (made
  here, or by another backend) send no id to Gemini.
- json_schema goes out as `responseJsonSchema`, cut down to the keywords Gemini documents for it.
- http(s) image URLs are fetched by the gateway (gateway/images.py, within `images:`'s limits) and
  sent as `inlineData` with the image host's content type, not as `fileData.fileUri`: only newer
  models fetch URLs themselves, and the gateway's limits then hold for every backend alike.
- A blocked prompt (`promptFeedback.blockReason`) is a 200 with one empty `content_filter` choice.
- When a stream's body ends, the choices that got no `finishReason` are finished as if with STOP
  (`stop`, or `tool_calls` after a call; contracts/gemini.md §10.2), as SSE has no end marker and
  the body's end is the answer's. A body cut off by the connection is an error all the same (the
  transport raises it), and one without any candidate too. Usage is the last `usageMetadata` seen.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from typing import Any

import httpx
import orjson

from gateway.config import GeminiBackend
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    UpstreamProtocol,
    UpstreamRejected,
)
from gateway.images import NO_IMAGES, Image, ImageFetcher
from gateway.providers.base import batches, parsed, random_id
from gateway.schemas import (
    AudioPart,
    ChatRequest,
    Choice,
    Chunk,
    Completion,
    EmbeddingRequest,
    Embeddings,
    FilePart,
    FinishReason,
    ImagePart,
    Message,
    ModelInfo,
    RefusalPart,
    TextPart,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from gateway.sse import Event, SSEDecoder
from gateway.upstream import Upstream, json_or_none

ROLES = {"user": "user", "assistant": "model", "tool": "user", "function": "user"}
RESULT_ROLES = ("tool", "function")  # messages that become functionResponse parts
IMAGE_ROLES = ("user", "assistant")  # the messages whose image parts are sent
AUDIO = {"wav": "audio/wav", "mp3": "audio/mpeg"}  # input_audio.format -> mimeType
# OpenAI field -> generationConfig key, for values that mean the same thing on both sides.
CONFIG = {
    "temperature": "temperature",
    "top_p": "topP",
    "n": "candidateCount",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
}
METHODS = {"generateContent": "completion", "embedContent": "embedding"}
MODES = {"none": "NONE", "auto": "AUTO", "required": "ANY"}
# tool_choice allowed_tools.mode -> functionCallingConfig.mode; VALIDATED: call one of them, or answer
ALLOWED_MODES = {"auto": "VALIDATED", "required": "ANY"}
FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
            "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION"}  # fmt: skip
# The keywords `responseJsonSchema` accepts (contracts/gemini.md §2.3); the rest are dropped.
SCHEMA_KEYS = {"$id", "$defs", "$ref", "$anchor", "type", "format", "title", "description", "enum",
               "items", "prefixItems", "minItems", "maxItems", "minimum", "maximum", "anyOf", "oneOf",
               "properties", "additionalProperties", "required", "propertyOrdering"}  # fmt: skip
# What a tool-call id made here carries after `call_<random>`, each behind its marker (docstring).
SIGNATURE = "__ts__"
GEMINI_ID = "__id__"
INT32 = 2**31


# ---- request ----


def build_request(
    request: ChatRequest, model: str, *, images: Mapping[str, Image] = NO_IMAGES
) -> dict[str, Any]:
    """`images`: the request's http(s) image URLs, fetched (ImageFetcher.fetch)."""
    body: dict[str, Any] = {"contents": _contents(request.messages, images)}
    system = [m.text() for m in request.messages if m.role in ("system", "developer") and m.text()]
    if system:
        body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    config = _generation_config(request)
    if config:
        body["generationConfig"] = config
    if request.tools:
        declarations = [_declaration(tool.function) for tool in request.tools]
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
    if not out:
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
        parts += [_function_call(call, i, j) for j, call in enumerate(message.tool_calls or ())]
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
            calls[:0] = message.tool_calls or ()
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
            parts.append(_image(part.url, f"messages[{i}].content", fetched))
        elif isinstance(part, AudioPart):
            parts.append(_audio(part.input_audio, field + ".input_audio"))
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
    mime, data = _data_url(url, "image data URLs", param)
    return _inline(mime or "image/png", data, "image data URL", param)


def _audio(audio: dict[str, Any], param: str) -> dict[str, Any]:
    native = audio.get("format")
    mime = AUDIO.get(str(native))
    if mime is None:
        raise InvalidRequest(
            f"Gemini backends take input_audio as {' or '.join(AUDIO)}, not {native!r}",
            param=param + ".format",
        )
    return _inline(mime, audio.get("data"), "input_audio data", param + ".data")


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
    mime, data = _data_url(url, "file_data URLs", field)
    if not mime:
        raise InvalidRequest(
            "file_data must name its MIME type (data:application/pdf;base64,...)", param=field
        )
    return _inline(mime, data, "file_data", field)


def _data_url(url: str, what: str, param: str) -> tuple[str, str]:
    """(MIME type, base64 data) of a `data:<mime>;base64,<data>` URL."""
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise InvalidRequest(f"{what} must be base64-encoded", param=param)
    return header.removeprefix("data:").removesuffix(";base64"), data


def _inline(mime: str, data: Any, what: str, param: str) -> dict[str, Any]:
    if not isinstance(data, str):
        raise InvalidRequest(f"{what} must be a base64 string", param=param)
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error:
        raise InvalidRequest(f"{what} is not valid base64", param=param) from None
    return {"inlineData": {"mimeType": mime, "data": data}}


def _function_call(call: Any, i: int, j: int) -> dict[str, Any]:
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
    name = _tool_name(history, message.tool_call_id) or message.name
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


def _tool_name(history: list[Message], call_id: str | None) -> str | None:
    """The function a tool result answers, found through its call id (last match wins)."""
    for message in reversed(history):
        for call in message.tool_calls or ():
            if call.id == call_id:
                return call.function.name
    return None


def _generation_config(request: ChatRequest) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for field, key in CONFIG.items():
        value = getattr(request, field)
        if value is not None:
            config[key] = value
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
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        config["responseMimeType"] = "application/json"
        schema = response_format.json_schema.schema_ if response_format.json_schema else None
        if response_format.type == "json_schema" and schema:
            config["responseJsonSchema"] = _schema(schema)
    return config


def _schema(schema: Any) -> Any:
    """JSON Schema cut down to the keywords `responseJsonSchema` documents; `const` becomes `enum`."""
    if isinstance(schema, list):
        return [_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:  # a $ref may only have $-prefixed siblings
        return {key: value for key, value in schema.items() if key.startswith("$")}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "$defs") and isinstance(value, dict):
            out[key] = {name: _schema(sub) for name, sub in value.items()}
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "additionalProperties"):
            out[key] = _schema(value)
        elif key == "const" and "enum" not in schema:
            out["enum"] = [value]
        elif key in SCHEMA_KEYS:
            out[key] = value
    return out


def _declaration(function: Any) -> dict[str, Any]:
    fields = {"name": function.name, "description": function.description}
    fields["parametersJsonSchema"] = function.parameters
    return {key: value for key, value in fields.items() if value is not None}


def _calling_config(choice: str | dict[str, Any], names: set[str]) -> dict[str, Any]:
    if isinstance(choice, str):
        return {"mode": MODES[choice]}
    mode: str | None
    tools: Any
    kind = choice.get("type")
    if kind == "function":
        mode, tools = "ANY", [choice]
    elif kind == "allowed_tools" and isinstance(allowed := choice.get("allowed_tools"), dict):
        mode, tools = ALLOWED_MODES.get(str(allowed.get("mode"))), allowed.get("tools")
    else:
        raise InvalidRequest(
            "Gemini backends take a tool_choice of 'none', 'auto', 'required', type 'function'"
            " or type 'allowed_tools'",
            param="tool_choice",
        )
    if mode is None:
        raise InvalidRequest("allowed_tools.mode must be 'auto' or 'required'", param="tool_choice")
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest("allowed_tools.tools must list at least one function", param="tool_choice")
    chosen = [_function_name(tool) for tool in tools]
    for name in chosen:
        if name not in names:
            raise InvalidRequest(f"tool_choice names unknown function {name!r}", param="tool_choice")
    return {"mode": mode, "allowedFunctionNames": chosen}


def _function_name(tool: Any) -> Any:
    """X in `{"type": "function", "function": {"name": X}}`; None when the shape is another."""
    function = tool.get("function") if isinstance(tool, dict) else None
    return function.get("name") if isinstance(function, dict) else None


# ---- response ----


def finish_reason(native: str | None, tool_calls: bool) -> FinishReason:
    if native in FILTERED:
        return "content_filter"
    if native == "MAX_TOKENS":
        return "length"
    return "tool_calls" if tool_calls else "stop"  # STOP, OTHER, MALFORMED_..., unknown values


def usage(metadata: Any) -> Usage:
    """OpenAI counts reasoning in completion_tokens, and reports that part apart (contracts §10.4)."""
    meta = metadata if isinstance(metadata, dict) else {}
    thoughts = meta.get("thoughtsTokenCount")
    cached = meta.get("cachedContentTokenCount")
    return Usage(
        int(meta.get("promptTokenCount") or 0),
        int(meta.get("candidatesTokenCount") or 0) + int(thoughts or 0),
        cached_tokens=int(cached) if cached is not None else None,
        reasoning_tokens=int(thoughts) if thoughts is not None else None,
    )


def _tool_call(part: dict[str, Any], index: int) -> ToolCallDelta:
    call = part["functionCall"] if isinstance(part["functionCall"], dict) else {}
    call_id = random_id("call_")
    if part.get("thoughtSignature"):
        call_id += SIGNATURE + str(part["thoughtSignature"])
    if call.get("id"):
        call_id += GEMINI_ID + str(call["id"])
    arguments = orjson.dumps(call.get("args") or {}).decode()
    return ToolCallDelta(index=index, id=call_id, name=str(call.get("name") or ""), arguments=arguments)


def _candidates(body: dict[str, Any]) -> list[tuple[int, list[dict[str, Any]], str | None]]:
    """(choice index, parts, finishReason) per candidate; proto3 leaves out zeros and empty lists."""
    out = []
    for position, candidate in enumerate(c for c in body.get("candidates") or () if isinstance(c, dict)):
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        parts = [part for part in parts or () if isinstance(part, dict)]
        out.append((int(candidate.get("index", position)), parts, candidate.get("finishReason")))
    return out


def _blocked(body: dict[str, Any]) -> bool:
    feedback = body.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def parse_response(body: Any) -> Completion:
    if not isinstance(body, dict):
        raise UpstreamProtocol("Gemini answered with something other than a JSON object")
    candidates = _candidates(body)
    if not candidates and _blocked(body):
        metadata = body.get("usageMetadata")
        return Completion(
            [Choice(content="", finish_reason="content_filter")],
            usage(metadata),
            counted=isinstance(metadata, dict),
        )
    if not candidates:
        raise UpstreamProtocol("Gemini answered without candidates")
    choices = []
    for index, parts, reason in candidates:
        text: list[str] = []
        thoughts: list[str] = []
        calls: list[ToolCallDelta] = []
        for part in parts:
            if "functionCall" in part:
                calls.append(_tool_call(part, len(calls)))
            elif isinstance(part.get("text"), str):
                (thoughts if part.get("thought") else text).append(part["text"])
        choices.append(
            Choice(
                index=index,
                content="".join(text) or (None if calls else ""),
                reasoning="".join(thoughts) or None,
                tool_calls=calls,
                finish_reason=finish_reason(reason, bool(calls)),
            )
        )
    metadata = body.get("usageMetadata")
    return Completion(
        sorted(choices, key=lambda c: c.index), usage(metadata), counted=isinstance(metadata, dict)
    )


class StreamState:
    """Turns SSE payloads into chunks; remembers what a stream has seen so far, per choice."""

    __slots__ = ("done", "finished", "tool_calls", "usage", "usage_sent")

    def __init__(self) -> None:
        self.tool_calls: dict[int, int] = {}  # choice index -> calls emitted so far
        self.finished: set[int] = set()
        self.usage: Usage | None = None
        self.usage_sent = False
        self.done = False

    def parse_chunk(self, data: Any) -> list[Chunk]:
        if not isinstance(data, dict):
            raise UpstreamProtocol("Gemini sent a stream event that is not a JSON object")
        if "error" in data:
            code = data["error"].get("code") if isinstance(data["error"], dict) else None
            raise error_from(int(code or 500), orjson.dumps(data), "")
        if "usageMetadata" in data:
            self.usage, self.usage_sent = usage(data["usageMetadata"]), False
        candidates = _candidates(data)
        if not candidates and _blocked(data):
            self.done = True
            self.finished.add(0)
            return [self._finish(Chunk(finish_reason="content_filter"))]
        chunks: list[Chunk] = []
        for index, parts, reason in candidates:
            calls = self.tool_calls.setdefault(index, 0)
            for part in parts:
                if "functionCall" in part:
                    chunks.append(Chunk(tool_calls=[_tool_call(part, calls)], index=index))
                    calls += 1
                elif part.get("text") and part.get("thought"):
                    chunks.append(Chunk(reasoning=str(part["text"]), index=index))
                elif part.get("text"):
                    chunks.append(Chunk(content=str(part["text"]), index=index))
            self.tool_calls[index] = calls
            if reason and index not in self.finished:
                self.done = True
                self.finished.add(index)
                chunks.append(
                    self._finish(Chunk(finish_reason=finish_reason(reason, calls > 0), index=index))
                )
        return chunks

    def _finish(self, chunk: Chunk) -> Chunk:
        chunk.usage, self.usage_sent = self.usage, self.usage is not None
        return chunk

    def close(self) -> list[Chunk]:
        """End of body: finish the choices still open (a missing finishReason is STOP); hand over
        usage that came after the finish. A body without any candidate is no answer at all."""
        if not self.done and not self.tool_calls:
            raise UpstreamProtocol("Gemini ended the stream without any candidate")
        chunks = [
            self._finish(Chunk(finish_reason=finish_reason(None, calls > 0), index=index))
            for index, calls in sorted(self.tool_calls.items())
            if index not in self.finished
        ]
        if self.usage is not None and not self.usage_sent:
            chunks.append(self._finish(Chunk(usage=self.usage)))
        return chunks


def parse_chunk(data: Any, state: StreamState) -> list[Chunk]:
    return state.parse_chunk(data)


def error_from(
    status: int, content: bytes, model: str, headers: Mapping[str, str] | None = None
) -> GatewayError:
    body = json_or_none(content)
    if isinstance(body, list) and len(body) == 1:  # errors may come wrapped in a one-element array
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {"message": content[:200].decode("utf-8", "replace")}
    text = str(error.get("message") or "")[:300]
    kind = str(error.get("status") or "")
    details = [d for d in error.get("details") or () if isinstance(d, dict)]
    if kind == "NOT_FOUND" or (status == 404 and not kind):
        return ModelNotFound(f"The model '{model.removeprefix('models/')}' is not available on Gemini")
    if any(d.get("reason") == "API_KEY_INVALID" for d in details):  # a 400 the client cannot fix
        return UpstreamRejected("Gemini refused the gateway's API key", upstream_status=401)
    if kind in ("INVALID_ARGUMENT", "FAILED_PRECONDITION") or (status == 400 and not kind):
        return InvalidRequest(f"Gemini rejected the request: {text}")
    if kind in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        upstream = 401 if kind == "UNAUTHENTICATED" else 403
        return UpstreamRejected(f"Gemini refused the gateway's credentials: {text}", upstream_status=upstream)
    codes = {"RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "INTERNAL": 500, "DEADLINE_EXCEEDED": 504}
    upstream = codes.get(kind, status)
    retry = (headers or {}).get("retry-after") or _retry_delay(details)
    return UpstreamRejected(
        f"Gemini answered {upstream}: {text}",
        upstream_status=upstream,
        headers={"retry-after": retry} if retry and upstream in (429, 503) else None,
    )


def _retry_delay(details: list[dict[str, Any]]) -> str | None:
    """Seconds from a RetryInfo detail (`"retryDelay": "37.5s"`), rounded up."""
    delays = [str(d["retryDelay"]).removesuffix("s") for d in details if "retryDelay" in d]
    try:
        return str(math.ceil(float(delays[0]))) if delays else None
    except ValueError:
        return None


def _resource(model: str) -> str:
    return model if model.startswith(("models/", "tunedModels/")) else "models/" + model


# ---- I/O ----


class GeminiProvider:
    def __init__(
        self,
        backend: GeminiBackend,
        transport: httpx.AsyncBaseTransport,
        api_key: str | None = None,
        images: ImageFetcher | None = None,
    ) -> None:
        self.backend = backend
        self._images = images  # None: http(s) image URLs are refused, as without `images.fetch`
        auth = {"x-goog-api-key": api_key} if api_key else {}
        self._http = Upstream.for_backend(backend, transport, auth, error_from)

    def prepare(self, request: ChatRequest) -> Awaitable[Mapping[str, Image]] | None:
        return None if self._images is None else self._images.for_request(request, roles=IMAGE_ROLES)

    async def _fetch_images(self, request: ChatRequest) -> Mapping[str, Image]:
        # when the dispatcher prepared the request, they are all known already
        fetching = self.prepare(request)
        return NO_IMAGES if fetching is None else await fetching

    async def complete(self, request: ChatRequest, model: str) -> Completion:
        images = await self._fetch_images(request)
        body, path = build_request(request, model, images=images), f"/{_resource(model)}:generateContent"
        answer = await self._http.request("POST", path, body, model)
        return parsed(parse_response, answer, "Gemini")

    async def stream(self, request: ChatRequest, model: str) -> AsyncIterator[list[Chunk]]:
        state = StreamState()
        decoder = SSEDecoder()
        path = f"/{_resource(model)}:streamGenerateContent?alt=sse"
        payload = build_request(request, model, images=await self._fetch_images(request))

        def parse(event: Event) -> list[Chunk]:
            return state.parse_chunk(orjson.loads(event.data))

        async with self._http.stream(path, payload, model) as body:
            async for chunks in batches(body, decoder, parse, "Gemini"):
                yield chunks
        closing = state.close()  # the body ended cleanly: one cut off raised above
        if closing:
            yield closing

    async def embed(self, request: EmbeddingRequest, model: str) -> Embeddings:
        texts = [request.input] if isinstance(request.input, str) else request.input
        if not texts or not all(isinstance(text, str) for text in texts):
            raise InvalidRequest("Gemini backends take text input, not token arrays", param="input")
        resource = _resource(model)
        one: dict[str, Any] = {"model": resource}
        if request.dimensions is not None:
            one["outputDimensionality"] = request.dimensions
        body = {"requests": [{**one, "content": {"parts": [{"text": text}]}} for text in texts]}
        answer = await self._http.request("POST", f"/{resource}:batchEmbedContents", body, model)
        found = answer.get("embeddings") if isinstance(answer, dict) else None
        if not isinstance(found, list) or len(found) != len(texts):
            raise UpstreamProtocol(
                f"Gemini at {self.backend.base_url} answered batchEmbedContents without one vector per input"
            )
        vectors = [list(e.get("values") or []) if isinstance(e, dict) else [] for e in found]
        return Embeddings(vectors, usage(answer.get("usageMetadata")).prompt_tokens)

    async def list_models(self) -> list[ModelInfo]:
        models: list[ModelInfo] = []
        query = "?pageSize=1000"
        while True:  # follow nextPageToken until it is missing
            page = await self._http.request("GET", "/models" + query)
            page = page if isinstance(page, dict) else {}
            models += [info for e in page.get("models") or () if (info := model_info(e)) is not None]
            if not page.get("nextPageToken"):
                return models
            query = f"?pageSize=1000&pageToken={page['nextPageToken']}"

    async def loaded_models(self) -> list[str] | None:
        return None

    async def probe(self) -> None:
        await self._http.request("GET", "/models?pageSize=1")


def model_info(entry: Any) -> ModelInfo | None:
    """A listed model the gateway can use (it generates or embeds), or None."""
    methods = entry.get("supportedGenerationMethods") or () if isinstance(entry, dict) else ()
    capabilities = [name for method, name in METHODS.items() if method in methods]
    if not capabilities:
        return None
    capabilities += ["thinking"] if entry.get("thinking") else []
    name = str(entry.get("name") or "").removeprefix("models/")
    return ModelInfo(id=name, owned_by="google", remote=True, capabilities=tuple(capabilities))
