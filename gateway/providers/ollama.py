"""Ollama's native API (`/api/chat`, NDJSON streams) behind the OpenAI surface.

Translation choices (contracts/ollama.md §8):
- temperature and top_p are sent only when the client sets them, so the Modelfile's defaults apply
  otherwise (Ollama's own /v1 layer forces 1.0; we prefer what the model's author tuned).
- `tool_choice: "none"` drops the tools; a named function keeps only that tool, `allowed_tools`
  only those it lists; `required` sends all tools (Ollama has no way to force a call).
- `n` > 1 is refused (400, param n): Ollama returns one choice.
- Gateway extensions in the body are passed on: `options` (merged under the mapped ones),
  `keep_alive`, `think`; `reasoning_effort` maps to `think`, left out for a model whose /api/show
  capabilities lack `thinking` (Ollama answers 400 to it).
- A stream that ends without Ollama's `done` line is reported as an error, never as a clean finish.
- `input_audio` parts go into `images` (where Ollama takes audio bytes); `file` parts are refused
  (400 naming the part): Ollama has no field for them, and nothing is dropped silently.
- http(s) image URLs are fetched by the gateway (gateway/images.py, within `images:`'s limits) and
  sent as base64 like data URLs: Ollama cannot fetch them itself.
- Embeddings always have the length `dimensions` asks for: servers that ignore the field (0.5.4)
  get their vectors cut and rescaled to unit length as newer Ollama does; shorter ones are a 400.
- A prompt Ollama silently cut to the context size is reported (notice `prompt_truncated`) when the
  context size is known: the request's `options.num_ctx`, else the model's from `/api/show`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import orjson

from gateway.config import OllamaBackend
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    UpstreamProtocol,
    UpstreamRejected,
)
from gateway.images import NO_IMAGES, Image, ImageFetcher
from gateway.ndjson import NDJSONDecoder
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
    ToolCallDelta,
    Usage,
)
from gateway.upstream import Upstream, json_or_none

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# OpenAI field -> Ollama option, for values that mean the same thing on both sides.
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
PROMPT_TRUNCATED = "prompt_truncated"  # notice key; its value is the context size in tokens
NUM_CTX = re.compile(r"^num_ctx\s+(\d+)", re.MULTILINE)
CONTEXT_WAIT = 1.0  # seconds a finished stream waits for its model's context size, if still unknown
THINK = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
         "max": "max", "xhigh": "max", "ultra": "max"}  # fmt: skip
EXTENSIONS = ("keep_alive", "think")
AUDIO_FORMATS = ("wav", "mp3")  # what OpenAI's input_audio.format allows (contracts/openai.md 2.2)


# ---- request ----


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
    effort = extra.get("reasoning_effort")
    if effort is not None and "think" not in body:
        if effort not in THINK:
            raise InvalidRequest(f"unknown reasoning_effort {effort!r}", param="reasoning_effort")
        # Ollama answers 400 to `think` for a model without the capability (contracts/ollama.md 8.8)
        if capabilities is None or "thinking" in capabilities:
            body["think"] = THINK[effort]
    return body


def needs_capabilities(request: ChatRequest) -> bool:
    """Whether build_request's answer depends on the model's capabilities: reasoning_effort does."""
    extra = request.model_extra or {}
    return extra.get("reasoning_effort") is not None and "think" not in extra


def _messages(messages: list[Message], fetched: Mapping[str, Image]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.role, "tool")  # legacy `function` results are tool results
        native: dict[str, Any] = {"role": role, "content": message.text()}
        images = _media(message, i, fetched)
        if images:
            native["images"] = images
        if message.tool_calls:
            native["tool_calls"] = [_tool_call(call, i, j) for j, call in enumerate(message.tool_calls)]
        extra = message.model_extra or {}
        reasoning = extra.get("reasoning_content") or extra.get("reasoning")
        if role == "assistant" and isinstance(reasoning, str):
            native["thinking"] = reasoning
        if role == "tool":
            name = message.name or _tool_name(messages[:i], message.tool_call_id)
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
            media.append(_image(part.url, f"messages[{i}].content", fetched))
        elif isinstance(part, AudioPart):
            media.append(_audio(part.input_audio, f"messages[{i}].content[{j}].input_audio"))
        elif isinstance(part, FilePart):
            raise InvalidRequest(
                "Ollama backends cannot take file parts; send the file's text as a text part",
                param=f"messages[{i}].content[{j}]",
            )
    return media


def _audio(audio: dict[str, Any], param: str) -> str:
    if audio.get("format") not in AUDIO_FORMATS:
        raise InvalidRequest("input_audio format must be 'wav' or 'mp3'", param=param + ".format")
    data = audio.get("data")
    if not isinstance(data, str) or not data:
        raise InvalidRequest("input_audio data must be a base64 string", param=param + ".data")
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error:
        raise InvalidRequest("input_audio data is not valid base64", param=param + ".data") from None
    return data


def _image(url: str, param: str, fetched: Mapping[str, Image]) -> str:
    if url in fetched:
        return fetched[url].data
    if not url.startswith("data:"):
        raise InvalidRequest(
            "Ollama backends need images inline: send a base64 data URL (data:image/png;base64,...)",
            param=param,
        )
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise InvalidRequest("image data URLs must be base64-encoded", param=param)
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error:
        raise InvalidRequest("image data URL is not valid base64", param=param) from None
    return data


def _tool_call(call: Any, i: int, j: int) -> dict[str, Any]:
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


def _tool_name(history: list[Message], call_id: str | None) -> str | None:
    """The function a tool result answers, found through its call id (last match wins)."""
    for message in reversed(history):
        for call in message.tool_calls or ():
            if call.id == call_id:
                return call.function.name
    return None


def _options(request: ChatRequest) -> dict[str, Any]:
    extra = request.model_extra or {}
    supplied = extra.get("options")
    options: dict[str, Any] = dict(supplied) if isinstance(supplied, dict) else {}
    for field, option in OPTIONS.items():
        value = getattr(request, field)
        if value is not None:
            options[option] = value
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
    if not request.tools or request.tool_choice == "none":
        return []
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    allowed = _allowed_tools(request.tool_choice)
    if allowed is None:
        return tools
    known = {tool["function"]["name"] for tool in tools}
    for name in allowed:
        if name not in known:
            raise InvalidRequest(f"tool_choice names unknown function {name!r}", param="tool_choice")
    return [tool for tool in tools if tool["function"]["name"] in allowed]


def _allowed_tools(choice: str | dict[str, Any] | None) -> list[str] | None:
    """The function names `tool_choice` limits the tools to, or None for all of them. Ollama cannot
    force a call, so a named function or `allowed_tools` (either mode) sends only those tools."""
    if not isinstance(choice, dict):
        return None  # "auto", "required"
    kind = choice.get("type")
    if kind == "function":
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise InvalidRequest("tool_choice needs 'function.name'", param="tool_choice")
        return [name]
    if kind == "allowed_tools":
        spec = choice.get("allowed_tools")
        entries = spec.get("tools") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or spec.get("mode", "auto") not in ("auto", "required"):
            raise InvalidRequest(
                "tool_choice.allowed_tools needs 'mode' 'auto' or 'required'", param="tool_choice"
            )
        names = [_function_name(entry) for entry in entries] if isinstance(entries, list) else []
        if not names or None in names:
            raise InvalidRequest(
                "tool_choice.allowed_tools.tools must list functions as {type: function, function: {name}}",
                param="tool_choice",
            )
        return [name for name in names if name is not None]
    raise InvalidRequest(
        "tool_choice must be 'none', 'auto', 'required', or of type 'function' or 'allowed_tools'"
        " for Ollama backends",
        param="tool_choice",
    )


def _function_name(entry: Any) -> str | None:
    function = entry.get("function") if isinstance(entry, dict) and entry.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


# ---- response ----


def finish_reason(done_reason: str | None, tool_calls: bool) -> FinishReason:
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def usage(body: dict[str, Any]) -> Usage:
    return Usage(int(body.get("prompt_eval_count") or 0), int(body.get("eval_count") or 0))


def _tool_calls(native: list[dict[str, Any]], first_index: int) -> list[ToolCallDelta]:
    calls = []
    for offset, call in enumerate(native):
        function = call.get("function") or {}
        arguments = function.get("arguments")
        calls.append(
            ToolCallDelta(
                index=first_index + offset,
                id=call.get("id") or random_id("call_"),
                name=function.get("name", ""),
                arguments=arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode(),
            )
        )
    return calls


def parse_response(body: Any) -> Completion:
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        raise UpstreamProtocol("Ollama answered without a 'message' object")
    if not body.get("done", False):
        raise UpstreamProtocol(
            "Ollama ended the answer without 'done'; it may be incomplete", code="upstream_incomplete"
        )
    message = body["message"]
    calls = _tool_calls(message.get("tool_calls") or [], 0)
    choice = Choice(
        content=message.get("content") or ("" if not calls else None),
        reasoning=message.get("thinking") or None,
        tool_calls=calls,
        finish_reason=finish_reason(body.get("done_reason"), bool(calls)),
        logprobs=_logprobs(body),
    )
    return Completion([choice], usage(body))


def _logprobs(line: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A line's `logprobs`, asked for with `logprobs: true`: OpenAI's `logprobs.content` entries."""
    logprobs = line.get("logprobs")
    return [entry for entry in logprobs if isinstance(entry, dict)] if isinstance(logprobs, list) else None


class StreamState:
    """Turns NDJSON lines into chunks; remembers what a stream has seen so far."""

    __slots__ = ("done", "tool_calls", "usage")

    def __init__(self) -> None:
        self.tool_calls = 0
        self.done = False
        self.usage: Usage | None = None

    def parse_chunk(self, line: Any) -> list[Chunk]:
        if not isinstance(line, dict):
            raise UpstreamProtocol("Ollama sent a stream line that is not a JSON object")
        if "error" in line:
            raise UpstreamRejected(
                f"Ollama reported an error mid-stream: {line['error']}", upstream_status=500
            )
        chunks: list[Chunk] = []
        message = line.get("message") or {}
        if message.get("thinking"):
            chunks.append(Chunk(reasoning=message["thinking"]))
        if message.get("content"):
            logprobs = _logprobs(line) if "logprobs" in line else None
            chunks.append(Chunk(content=message["content"], logprobs=logprobs))
        if message.get("tool_calls"):
            calls = _tool_calls(message["tool_calls"], self.tool_calls)
            self.tool_calls += len(calls)
            chunks.append(Chunk(tool_calls=calls))
        if line.get("done"):
            self.done = True
            reason = finish_reason(line.get("done_reason"), self.tool_calls > 0)
            self.usage = usage(line)
            chunks.append(Chunk(finish_reason=reason, usage=self.usage))
        return chunks


def parse_chunk(line: Any, state: StreamState) -> list[Chunk]:
    return state.parse_chunk(line)


def error_from(
    status: int, content: bytes, model: str, headers: Mapping[str, str] | None = None
) -> GatewayError:
    body = json_or_none(content)
    text = body.get("error") if isinstance(body, dict) else None
    text = str(text) if text else content[:200].decode("utf-8", errors="replace")
    if status == 404:
        return ModelNotFound(
            f"The model '{model}' is not available on the Ollama server;"
            f" run `ollama pull {model}` there to install it."
        )
    if status == 400:
        param = next((p for p in ("tools", "format", "stop", "images", "think") if p in text), None)
        params = {"format": "response_format", "images": "messages", "think": "reasoning_effort"}
        return InvalidRequest(f"Ollama rejected the request: {text}", param=params.get(param or "", param))
    given = (headers or {}).get("retry-after")
    retry = {"retry-after": given or "1"} if status in (429, 503) else None
    return UpstreamRejected(f"Ollama answered {status}: {text}", upstream_status=status, headers=retry)


def shorten(vector: Any, dimensions: int, where: str) -> list[float]:
    """`vector` with exactly `dimensions` values. Servers older than Ollama's `dimensions` support
    (0.5.4 among them) ignore the field and answer full-length vectors: those are cut and scaled back
    to unit length, as newer servers do themselves (normalize(embedding[:dimensions]))."""
    if not isinstance(vector, list) or not vector:
        raise UpstreamProtocol(f"{where} answered /api/embed with an empty or malformed vector")
    if len(vector) == dimensions:  # the server applied `dimensions` itself
        return vector
    if len(vector) < dimensions:
        raise InvalidRequest(
            f"{where} makes {len(vector)}-dimensional embeddings; 'dimensions' must be at most {len(vector)}",
            param="dimensions",
        )
    head = vector[:dimensions]
    try:
        norm = math.sqrt(math.fsum(value * value for value in head))
    except TypeError:
        raise UpstreamProtocol(f"{where} answered /api/embed with a vector of non-numbers") from None
    scale = 1 / max(norm, 1e-12)  # Ollama's guard: a zero vector stays zero
    return [value * scale for value in head]


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What /api/show says about a model, as far as the translation uses it."""

    context_size: int | None = None
    capabilities: frozenset[str] | None = None  # None: not reported (older servers, 0.5.4 too)


def model_facts(show: Any) -> ModelFacts:
    """The facts in an /api/show answer."""
    if not isinstance(show, dict):
        return ModelFacts()
    match = NUM_CTX.search(str(show.get("parameters") or ""))
    listed = show.get("capabilities")
    return ModelFacts(
        context_size=int(match.group(1)) if match else None,
        capabilities=frozenset(map(str, listed)) if isinstance(listed, list) else None,
    )


def created_at(value: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(value)).timestamp())
    except ValueError:
        return 0


# ---- I/O ----


class OllamaProvider:
    def __init__(
        self,
        backend: OllamaBackend,
        transport: httpx.AsyncBaseTransport,
        api_key: str | None = None,
        images: ImageFetcher | None = None,
    ) -> None:
        self.backend = backend
        self._images = images  # None: http(s) image URLs are refused, as without `images.fetch`
        auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = Upstream.for_backend(backend, transport, auth, error_from)
        self._facts: dict[str, asyncio.Task[ModelFacts]] = {}  # model -> its /api/show, asked once

    def prepare(self, request: ChatRequest) -> Awaitable[Mapping[str, Image]] | None:
        return None if self._images is None else self._images.for_request(request)

    async def _fetch_images(self, request: ChatRequest) -> Mapping[str, Image]:
        # when the dispatcher prepared the request, they are all known already
        fetching = self.prepare(request)
        return NO_IMAGES if fetching is None else await fetching

    async def complete(self, request: ChatRequest, model: str) -> Completion:
        images = await self._fetch_images(request)
        capabilities = await self._capabilities(model) if needs_capabilities(request) else None
        body = build_request(request, model, stream=False, images=images, capabilities=capabilities)
        answer = await self._http.request("POST", "/api/chat", body, model)
        completion = parsed(parse_response, answer, "Ollama")
        completion.notices.update(await self._truncation(model, body, completion.usage))
        return completion

    def _facts_of(self, model: str) -> asyncio.Task[ModelFacts]:
        """The lookup of the model's /api/show (asked once per model, shared by every request)."""
        if model not in self._facts:
            self._facts[model] = asyncio.create_task(self._show(model))
        return self._facts[model]

    async def _capabilities(self, model: str) -> frozenset[str] | None:
        facts = self._facts_of(model)
        # shielded: a request that goes away does not cancel the lookup the others share
        return (facts.result() if facts.done() else await asyncio.shield(facts)).capabilities

    def _context_size_of(self, model: str, body: dict[str, Any]) -> int | asyncio.Task[ModelFacts]:
        """The request's own num_ctx, or the lookup of the model's."""
        size = (body.get("options") or {}).get("num_ctx")
        return size if isinstance(size, int) else self._facts_of(model)

    async def _truncation(
        self, model: str, body: dict[str, Any], used: Usage, wait: float | None = None
    ) -> dict[str, str]:
        """Ollama cuts a prompt longer than the context without an error (HTTP 200); the only trace is
        a prompt count equal to the context size. Say so, when the context size can be known
        (within `wait` seconds of the answer's end, for a stream: its end is not held up longer)."""
        if not used.prompt_tokens:
            return {}
        size: int | asyncio.Task[ModelFacts] | None = self._context_size_of(model, body)
        if isinstance(size, asyncio.Task):
            if size.done():  # known since an earlier answer: no wait to set up
                size = size.result().context_size
            else:
                try:
                    size = (await asyncio.wait_for(asyncio.shield(size), wait)).context_size
                except TimeoutError:
                    return {}  # the lookup goes on, for the next answer
        if size is None or used.prompt_tokens < size:
            return {}
        return {PROMPT_TRUNCATED: str(size)}

    async def _show(self, model: str) -> ModelFacts:
        try:
            return model_facts(await self._http.request("POST", "/api/show", {"model": model}, model))
        except GatewayError:
            return ModelFacts()

    async def stream(self, request: ChatRequest, model: str) -> AsyncIterator[list[Chunk]]:
        state = StreamState()
        decoder = NDJSONDecoder()
        images = await self._fetch_images(request)
        capabilities = await self._capabilities(model) if needs_capabilities(request) else None
        payload = build_request(request, model, stream=True, images=images, capabilities=capabilities)
        begun = False
        async with self._http.stream("/api/chat", payload, model) as body:
            async for chunks in batches(body, decoder, state.parse_chunk, "Ollama"):
                if not begun:  # the answer has begun: the model's context size is looked up meanwhile
                    begun = True
                    self._context_size_of(model, payload)
                yield chunks
        used = state.usage
        if used is not None and (notices := await self._truncation(model, payload, used, CONTEXT_WAIT)):
            yield [Chunk(notices=notices)]
        if not state.done:
            raise UpstreamProtocol(
                f"Ollama server at {self.backend.base_url} ended the stream without its final 'done' line;"
                " the answer may be incomplete",
                code="upstream_incomplete",
            )

    async def embed(self, request: EmbeddingRequest, model: str) -> Embeddings:
        if not isinstance(request.input, str) and request.input and not isinstance(request.input[0], str):
            raise InvalidRequest("Ollama backends take text input, not token arrays", param="input")
        body: dict[str, Any] = {"model": model, "input": request.input}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        answer = await self._http.request("POST", "/api/embed", body, model)
        vectors = answer.get("embeddings") if isinstance(answer, dict) else None
        if not isinstance(vectors, list):
            raise UpstreamProtocol(
                f"Ollama server at {self.backend.base_url} answered /api/embed without 'embeddings'"
            )
        if request.dimensions is not None:
            where = f"'{model}' on the Ollama server at {self.backend.base_url}"
            vectors = [shorten(vector, request.dimensions, where) for vector in vectors]
        return Embeddings(vectors, int(answer.get("prompt_eval_count") or 0))

    async def list_models(self) -> list[ModelInfo]:
        body = await self._http.request("GET", "/api/tags")
        models = body.get("models") if isinstance(body, dict) else None
        return [model_info(entry) for entry in models or [] if isinstance(entry, dict)]

    async def loaded_models(self) -> list[str] | None:
        body = await self._http.request("GET", "/api/ps")
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            return None
        return [str(m.get("model") or m.get("name")) for m in models if isinstance(m, dict)]

    async def probe(self) -> None:
        await self._http.request("GET", "/api/version")


def model_info(entry: dict[str, Any]) -> ModelInfo:
    name = str(entry.get("model") or entry.get("name") or "")
    namespace, _, _ = name.rpartition("/")
    remote = bool(entry.get("remote_host") or entry.get("remote_model")) or name.endswith(
        ("-cloud", ":cloud")
    )
    return ModelInfo(
        id=name,
        created=created_at(entry.get("modified_at")),
        owned_by=namespace or "library",
        remote=remote,
        capabilities=tuple(entry.get("capabilities") or ()),
    )
