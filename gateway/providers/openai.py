"""OpenAI and every OpenAI-compatible server (vLLM, llama.cpp server, LM Studio) behind the same surface.

Requests pass through as the client sent them, with the model name rewritten; fields the gateway
does not know are kept (`extra="allow"`). Streams always ask upstream for
`stream_options.include_usage` so tokens can be counted; relay shows the usage chunk to the client
only when it asked. Answers are parsed into the same chunks as every other backend, so the client
sees the gateway's ids and one consistent stream shape.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import httpx
import orjson

from gateway.config import OpenAIBackend
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelMissing,
    PrivacyViolation,
    UpstreamProtocol,
    UpstreamRejected,
    quoting,
)
from gateway.providers.base import batches, parsed, shorten
from gateway.schemas import (
    ChatRequest,
    Choice,
    Chunk,
    Completion,
    EmbeddingRequest,
    Embeddings,
    FinishReason,
    ModelInfo,
    ToolCallDelta,
    Usage,
)
from gateway.sse import Event, SSEDecoder
from gateway.upstream import Upstream, json_or_none, let_end

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}
# Fields that go upstream only as `_metadata` keeps them (embeddings have none).
GATEWAY_FIELDS = ("metadata",)
# OpenAI's words for a prompt past the context, which vLLM (and servers copying OpenAI) use too, but
# with a numeric `code` (400) where OpenAI says context_length_exceeded.
CONTEXT_EXCEEDED = re.compile(r"maximum context length is \d+", re.IGNORECASE)
# Top-level answer fields passed on to the client as they came.
PASSED_ON = ("system_fingerprint", "service_tier")


# ---- request ----


def build_request(request: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
    body = request.model_dump(exclude_unset=True, by_alias=True)
    _metadata(body)
    _complete_calls(body)
    body["model"] = model
    body["stream"] = stream
    if stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    else:
        body.pop("stream_options", None)
    return body


def _complete_calls(body: dict[str, Any]) -> None:
    """History tool calls get the fields OpenAI's schema requires and the gateway lets clients
    leave out, as the other backends read them: `type` (`function`) and a function's `arguments`
    (`{}`, no arguments). OpenAI would refuse the call without them."""
    for message in body.get("messages") or ():
        for call in message.get("tool_calls") or ():
            call.setdefault("type", "function")
            if call["type"] == "function":
                call["function"].setdefault("arguments", "{}")


def _metadata(body: dict[str, Any]) -> None:
    """`metadata` goes upstream without the gateway's own `privacy` key, and only with
    `store: true`: OpenAI refuses it otherwise ("only allowed when 'store' is enabled")."""
    metadata = body.pop("metadata", None)
    kept = {key: value for key, value in (metadata or {}).items() if key != "privacy"}
    if kept and body.get("store") is True:
        body["metadata"] = kept


# ---- response ----


def finish_reason(value: Any, tool_calls: bool) -> FinishReason:
    if tool_calls and value in (None, "stop"):
        return "tool_calls"
    return FINISH_REASONS.get(str(value), "stop")


def usage(body: Any) -> Usage:
    if not isinstance(body, dict):
        return Usage()
    return Usage(
        int(body.get("prompt_tokens") or 0),
        int(body.get("completion_tokens") or 0),
        cached_tokens=_detail(body, "prompt_tokens_details", "cached_tokens"),
        reasoning_tokens=_detail(body, "completion_tokens_details", "reasoning_tokens"),
    )


def _detail(usage: dict[str, Any], details: str, name: str) -> int | None:
    breakdown = usage.get(details)
    value = breakdown.get(name) if isinstance(breakdown, dict) else None
    return value if isinstance(value, int) else None


def _logprobs(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A choice's `logprobs.content`, when the backend sent it (it does when asked)."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    return content if isinstance(content, list) else None


# A tool call's fields the gateway rebuilds; the others a backend sends are passed on as they came.
CALL_FIELDS = ("index", "id", "type", "function", "custom")


def _tool_call(call: dict[str, Any], index: int) -> ToolCallDelta:
    custom = isinstance(call.get("custom"), dict)  # a custom tool's call: free text input
    called = _called(call)
    extra = {key: value for key, value in call.items() if key not in CALL_FIELDS}
    return ToolCallDelta(
        index=index,
        id=call.get("id"),
        name=called.get("name"),
        arguments=called.get("input" if custom else "arguments") or "",
        custom=custom,
        extra=extra or None,
    )


def _called(call: dict[str, Any]) -> dict[str, Any]:
    """A call's `function`, or a custom tool's `custom`."""
    called = call.get("custom") if isinstance(call.get("custom"), dict) else call.get("function")
    return called if isinstance(called, dict) else {}


def _tool_calls(calls: Any) -> list[ToolCallDelta]:
    return [_tool_call(call, position) for position, call in enumerate(calls or [])]


class CallNumbers:
    """Numbers one choice's streamed tool calls 0, 1, 2… in the order they open, as OpenAI does and
    clients expect (the SDK's stream helper files a fragment under its `index` in a list). Backends
    differ: Gemini's OpenAI endpoint leaves `index` out and sends each call whole; others start at
    1 after a text or thinking block, or number every call 0. A fragment with an id not seen yet
    opens a call; one without index or id continues the last call, unless it names another
    function."""

    __slots__ = ("by_id", "by_index", "ids", "last", "names")

    def __init__(self) -> None:
        self.by_index: dict[int, int] = {}  # the backend's index -> the client's
        self.by_id: dict[str, int] = {}
        self.ids: list[str | None] = []  # per call opened
        self.names: list[str | None] = []
        self.last: int | None = None

    def number(self, call: dict[str, Any]) -> int:
        index, call_id = call.get("index"), call.get("id")
        index = index if isinstance(index, int) and not isinstance(index, bool) else None
        call_id = call_id if isinstance(call_id, str) and call_id else None
        name = _called(call).get("name") or None
        ours = self._known(index, call_id, name)
        if ours is None:
            ours = len(self.ids)
            self.ids.append(None)
            self.names.append(None)
        if index is not None:
            self.by_index[index] = ours
        if call_id is not None:
            self.by_id[call_id] = ours
            self.ids[ours] = self.ids[ours] or call_id
        self.names[ours] = self.names[ours] or name
        self.last = ours
        return ours

    def _known(self, index: int | None, call_id: str | None, name: str | None) -> int | None:
        """The call this fragment continues, or None when it opens one."""
        if call_id is not None and call_id in self.by_id:
            return self.by_id[call_id]
        if index is not None:
            ours = self.by_index.get(index)
            if ours is not None and call_id is not None and self.ids[ours] is not None:
                return None  # another id on an index in use: a backend that numbers every call 0
            return ours
        if call_id is not None or self.last is None:
            return None
        return self.last if name in (None, self.names[self.last]) else None


def parse_response(body: Any) -> Completion:
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise UpstreamProtocol("the OpenAI-compatible backend answered without 'choices'")
    choices = []
    for position, choice in enumerate(body["choices"]):
        message = choice.get("message") or {}
        calls = _tool_calls(message.get("tool_calls"))
        annotations = message.get("annotations")
        choices.append(
            Choice(
                index=int(choice.get("index", position)),
                content=message.get("content"),
                reasoning=message.get("reasoning_content") or message.get("reasoning") or None,
                tool_calls=calls,
                finish_reason=finish_reason(choice.get("finish_reason"), bool(calls)),
                refusal=message.get("refusal") or None,
                logprobs=_logprobs(choice),
                annotations=annotations if isinstance(annotations, list) and annotations else None,
            )
        )
    reported = body.get("usage")
    extra = {key: body[key] for key in PASSED_ON if isinstance(body.get(key), str)}
    return Completion(choices, usage(reported), counted=isinstance(reported, dict), extra=extra)


class StreamState:
    """Turns SSE events into chunks; remembers which choices finished and whether [DONE] came."""

    __slots__ = ("calls", "done", "envelope", "finished", "opened", "tool_calls", "usage")

    def __init__(self) -> None:
        self.done = False
        # the backend's system_fingerprint and service_tier: None once passed on with a chunk
        self.envelope: dict[str, str] | None = {}
        self.calls: dict[int, CallNumbers] = {}  # per choice
        self.opened: set[int] = set()  # choices the backend sent anything for, an empty delta too
        self.finished: set[int] = set()
        self.tool_calls: set[int] = set()
        self.usage = False  # a usage event came (the gateway always asks for one)

    def complete(self, choices: int) -> bool:
        """Whether the stream ended as a whole one does: with [DONE]; or, from a server that leaves
        that out, with every choice finished and the usage after them."""
        return self.done or (self.usage and len(self.finished) >= choices)

    def parse_chunk(self, data: str) -> list[Chunk]:
        if data.strip() == "[DONE]":
            self.done = True
            return self._close()
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamProtocol("the OpenAI-compatible backend sent an event that is not JSON") from None
        if not isinstance(event, dict):
            raise UpstreamProtocol("the OpenAI-compatible backend sent an event that is not a JSON object")
        if event.get("error"):
            raise _stream_error(event["error"])
        chunks = []
        for position, choice in enumerate(event.get("choices") or []):
            index = int(choice.get("index", position))
            delta = choice.get("delta") or {}
            calls = self._tool_calls(index, delta.get("tool_calls"))
            if calls:
                self.tool_calls.add(index)
            reason = choice.get("finish_reason")
            chunk = Chunk(
                content=delta.get("content") or "",
                reasoning=delta.get("reasoning_content") or delta.get("reasoning") or "",
                tool_calls=calls,
                finish_reason=finish_reason(reason, index in self.tool_calls) if reason else None,
                index=index,
                refusal=delta.get("refusal") or "",
                logprobs=_logprobs(choice),
            )
            self.opened.add(index)
            if reason:
                self.finished.add(index)
            if chunk.has_output or chunk.finish_reason:
                chunks.append(chunk)
        if event.get("usage"):
            self.usage = True
            chunks.append(Chunk(usage=usage(event["usage"])))
        if self.envelope is not None:
            self.envelope.update((key, event[key]) for key in PASSED_ON if isinstance(event.get(key), str))
            if self.envelope and chunks:  # before the first event the client gets, where servers send it
                chunks[0].envelope, self.envelope = self.envelope, None
        return chunks

    def _tool_calls(self, choice: int, calls: Any) -> list[ToolCallDelta]:
        if not calls:
            return []
        numbers = self.calls.setdefault(choice, CallNumbers())
        return [_tool_call(call, numbers.number(call)) for call in calls]

    def _close(self) -> list[Chunk]:
        """At [DONE]: a choice that was opened and never finished ends with `stop` (`tool_calls`
        after a call), as a Gemini body that ends without a finishReason does; an empty answer (its
        role delta alone) too, or the client's stream would hold a choice without a finish."""
        open_choices = sorted(self.opened - self.finished)
        self.finished.update(open_choices)
        return [Chunk(finish_reason=finish_reason(None, i in self.tool_calls), index=i) for i in open_choices]


def parse_chunk(data: str, state: StreamState) -> list[Chunk]:
    return state.parse_chunk(data)


def _code(error: Any) -> str | None:
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _stream_error(error: Any) -> GatewayError:
    message = str(error.get("message") if isinstance(error, dict) else error)
    rejected = UpstreamRejected(
        f"the OpenAI-compatible backend reported an error mid-stream: {message}",
        upstream_status=500,
        code=_code(error),
    )
    return quoting(rejected, message)


def error_from(
    status: int, content: bytes, model: str, headers: Mapping[str, str] | None = None
) -> GatewayError:
    body = json_or_none(content)
    error = body.get("error") if isinstance(body, dict) else None
    if error is None and isinstance(body, dict) and isinstance(body.get("message"), str):
        error = body  # at the top level, as SGLang, FastChat and older vLLM releases write it
    error = (
        error if isinstance(error, dict) else {"message": error or content[:200].decode("utf-8", "replace")}
    )
    said = str(error.get("message") or "")
    message = said or f"status {status}"
    if status == 404:  # this server lacks it: another deployment of the model may have it
        return quoting(
            ModelMissing(f"The model '{model}' is not available on the OpenAI-compatible backend: {message}"),
            said,
        )
    if status == 413:  # a proxy's limit, most often: its words alone would not say whose
        too_large = f"the OpenAI-compatible backend refused the request as too large (413): {message}"
        return quoting(InvalidRequest(too_large, code=_code(error)), said)
    if status in (400, 422):
        # llama.cpp's server says it with its own type, vLLM with OpenAI's words: OpenAI's code for both
        if error.get("type") == "exceed_context_size_error" or (
            _code(error) is None and CONTEXT_EXCEEDED.search(said)
        ):
            return quoting(InvalidRequest(message, param="messages", code="context_length_exceeded"), said)
        return quoting(InvalidRequest(message, param=error.get("param"), code=_code(error)), said)
    if status == 501:  # llama.cpp's server without --embeddings: alive, it just does not do that
        unsupported = f"the OpenAI-compatible backend does not support this request (501): {message}"
        return quoting(InvalidRequest(unsupported, code=_code(error)), said)
    if status == 403 and _code(error) == "privacy_violation":  # a Phoenix gateway keeping it local
        return quoting(
            PrivacyViolation(f"the OpenAI-compatible backend refused a private request: {message}"), said
        )
    if status in (401, 403):
        return UpstreamRejected(
            f"the backend refused the gateway's credentials ({status}); check its api_key_env",
            upstream_status=status,
        )
    retry = {k: v for k, v in (headers or {}).items() if k.lower() in ("retry-after", "retry-after-ms")}
    message = f"the OpenAI-compatible backend answered {status}: {message}"
    # Its code says which limit (rate_limit_exceeded, insufficient_quota) or what failed. Not so
    # for 401 and 403 above: those codes are about the gateway's key, not the client's.
    return quoting(UpstreamRejected(message, upstream_status=status, code=_code(error), headers=retry), said)


# ---- I/O ----


class OpenAIProvider:
    def __init__(
        self, backend: OpenAIBackend, transport: httpx.AsyncBaseTransport, api_key: str | None = None
    ) -> None:
        self.backend = backend
        auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = Upstream.for_backend(backend, transport, auth, error_from)

    def prepare(self, request: ChatRequest) -> None:
        return None  # image URLs go out as they came: the backend fetches them

    async def complete(self, request: ChatRequest, model: str) -> Completion:
        body = build_request(request, model, stream=False)
        answer = await self._http.request("POST", "/chat/completions", body, model)
        return parsed(parse_response, answer, "the OpenAI-compatible server")

    async def stream(self, request: ChatRequest, model: str) -> AsyncIterator[list[Chunk]]:
        state = StreamState()
        decoder = SSEDecoder()

        def parse(event: Event) -> list[Chunk]:
            if event.event == "error":  # an error named by its event type, whatever its data holds
                data = json_or_none(event.data.encode())
                raise _stream_error(data.get("error", data) if isinstance(data, dict) else event.data)
            return state.parse_chunk(event.data)

        async with (
            self._http.stream("/chat/completions", build_request(request, model, stream=True), model) as body,
            aclosing(
                batches(body, decoder, parse, "the OpenAI-compatible server", lambda: state.done)
            ) as reads,
        ):
            async for chunks in reads:
                yield chunks
            if state.done:  # [DONE]: the answer is whole, whether or not its body has ended
                let_end(body)
        if not state.complete(request.n or 1):
            raise UpstreamProtocol(
                f"the backend at {self.backend.base_url} ended the stream before finishing;"
                " the answer may be incomplete",
                code="upstream_incomplete",
            )

    async def embed(self, request: EmbeddingRequest, model: str) -> Embeddings:
        body = request.model_dump(exclude_unset=True, exclude=set(GATEWAY_FIELDS))
        body.update(model=model, encoding_format="float")
        answer = await self._http.request("POST", "/embeddings", body, model)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise UpstreamProtocol(
                f"the backend at {self.backend.base_url} answered /embeddings without 'data'"
            )
        ordered = sorted(data, key=lambda item: int(item.get("index", 0)))
        vectors = [item["embedding"] for item in ordered]
        if request.dimensions is not None:  # llama.cpp's server, and models that cannot shorten, ignore it
            where = f"'{model}' on the backend at {self.backend.base_url}"
            vectors = [shorten(vector, request.dimensions, where) for vector in vectors]
        counted = isinstance(answer.get("usage"), dict)
        return Embeddings(vectors, usage(answer.get("usage")).prompt_tokens, counted=counted)

    async def list_models(self) -> list[ModelInfo]:
        body = await self._http.request("GET", "/models")
        data = body.get("data") if isinstance(body, dict) else None
        return [
            ModelInfo(
                id=str(entry["id"]),
                created=int(entry.get("created") or 0),
                owned_by=str(entry.get("owned_by") or ""),
            )
            for entry in data or []
            if isinstance(entry, dict) and entry.get("id")
        ]

    async def loaded_models(self) -> list[str] | None:
        return None

    def forwards(self, model: str) -> bool:
        return False

    async def probe(self) -> None:
        await self._http.request("GET", "/models")
