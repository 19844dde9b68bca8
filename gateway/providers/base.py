"""What every provider offers the dispatcher: the same five calls whatever the protocol."""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import os
import string
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, Protocol, TypeVar

import orjson

from gateway.config import GeminiBackend, OllamaBackend, OpenAIBackend
from gateway.errors import GatewayError, InvalidRequest, UpstreamProtocol
from gateway.ndjson import LineTooLong
from gateway.schemas import (
    ChatRequest,
    Chunk,
    Completion,
    CustomTool,
    CustomToolCall,
    EmbeddingRequest,
    Embeddings,
    Message,
    ModelInfo,
    Tool,
    ToolCall,
)

BackendConfig = OllamaBackend | OpenAIBackend | GeminiBackend

_ID_ALPHABET = (string.ascii_letters + string.digits).encode()
# Random bytes to letters and digits in one `translate` (a slight bias to the first 8 of the 62).
_ID_TABLE = bytes(_ID_ALPHABET[b % len(_ID_ALPHABET)] for b in range(256))


def random_id(prefix: str, length: int = 24) -> str:
    return prefix + os.urandom(length).translate(_ID_TABLE).decode("ascii")


T = TypeVar("T")
R = TypeVar("R")
T_co = TypeVar("T_co", covariant=True)
FACTS_TIMEOUT = 10.0  # seconds a model's lookup may take: one still unanswered then has failed
FACTS_RETRY = 30.0  # seconds before a model's failed lookup is made again
# Lookups kept per backend: a pattern route passes on any name a client sends, typos included,
# and each would be kept for good. Past this, the oldest finished one goes (and is asked again).
FACTS_KEPT = 1024


AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg"}  # input_audio.format (contracts/openai.md 2.2)


def checked_base64(data: Any, what: str, param: str) -> str:
    """`data`, when it is base64 (a 400 naming `param` otherwise): backends take it as it is."""
    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"{what} must be a base64 string", param=param)
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error:
        raise InvalidRequest(f"{what} is not valid base64", param=param) from None
    return data


def data_url(url: str, what: str, param: str) -> tuple[str, str]:
    """(MIME type, checked base64 data) of a `data:<mime>;base64,<data>` URL; the type may be ""."""
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise InvalidRequest(f"{what} must be base64-encoded", param=param)
    return header.removeprefix("data:").removesuffix(";base64"), checked_base64(data, what, param)


def audio_data(audio: dict[str, Any], param: str) -> tuple[str, str]:
    """(MIME type, checked base64 data) of an `input_audio` part's object."""
    mime = AUDIO_TYPES.get(str(audio.get("format")))
    if mime is None:
        raise InvalidRequest(
            f"input_audio format must be 'wav' or 'mp3', not {audio.get('format')!r}", param=param + ".format"
        )
    return mime, checked_base64(audio.get("data"), "input_audio data", param + ".data")


def needs_tools(request: ChatRequest) -> None:
    """A `tool_choice` that asks for a call (`required`, a named function, `allowed_tools`) with no
    `tools` to call is a 400 naming tool_choice, as OpenAI answers it, not a request that quietly
    calls nothing."""
    if request.tool_choice not in (None, "none", "auto") and not request.tools:
        raise InvalidRequest(
            "tool_choice other than 'none' or 'auto' is only allowed when 'tools' are specified",
            param="tool_choice",
        )


def chosen_functions(choice: dict[str, Any], known: Collection[str], backend: str) -> tuple[bool, list[str]]:
    """A `tool_choice` object as (whether a call is required, the functions it may call): a named
    function is required; `allowed_tools` lists them with mode `auto` or `required`. Anything else,
    or a function the request's tools lack, is a 400 naming tool_choice."""
    kind = choice.get("type")
    entries: Any
    if kind == "function":
        required, entries = True, [choice]
    elif kind == "allowed_tools" and isinstance(allowed := choice.get("allowed_tools"), dict):
        if allowed.get("mode") not in ("auto", "required"):
            raise InvalidRequest(
                "tool_choice.allowed_tools.mode must be 'auto' or 'required'", param="tool_choice"
            )
        required, entries = allowed["mode"] == "required", allowed.get("tools")
    else:
        raise InvalidRequest(
            f"{backend} backends take a tool_choice of 'none', 'auto', 'required', or of type 'function'"
            " or 'allowed_tools'",
            param="tool_choice",
        )
    if not isinstance(entries, list) or not entries:
        raise InvalidRequest(
            "tool_choice.allowed_tools.tools must list at least one function", param="tool_choice"
        )
    names = [_function_name(entry) for entry in entries]
    if None in names:
        raise InvalidRequest(
            "tool_choice must name functions as {type: function, function: {name}}", param="tool_choice"
        )
    for name in names:
        if name not in known:
            raise InvalidRequest(f"tool_choice names unknown function {name!r}", param="tool_choice")
    return required, [name for name in names if name is not None]


def _function_name(entry: Any) -> str | None:
    """X in `{"type": "function", "function": {"name": X}}`; None when the shape is another."""
    function = entry.get("function") if isinstance(entry, dict) and entry.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def present(request: ChatRequest, table: Mapping[str, str]) -> dict[str, Any]:
    """The request's fields of `table` that are set, under the backend's names `table` gives them."""
    return {name: value for field, name in table.items() if (value := getattr(request, field)) is not None}


def function_tool(tool: Tool | CustomTool, backend: str, i: int) -> Tool:
    """`tool`, a function tool: custom tools exist at OpenAI only (contracts/openai.md 2.4)."""
    if isinstance(tool, CustomTool):
        raise InvalidRequest(
            f"{backend} backends take function tools only; custom tools are OpenAI's", param=f"tools[{i}]"
        )
    return tool


def function_call(call: ToolCall | CustomToolCall, backend: str, i: int, j: int) -> ToolCall:
    """`call`, a function call: a custom tool's call in the history cannot be given to `backend`."""
    if isinstance(call, CustomToolCall):
        raise InvalidRequest(
            f"{backend} backends take function calls only; custom tools are OpenAI's",
            param=f"messages[{i}].tool_calls[{j}]",
        )
    return call


def tool_name(history: list[Message], call_id: str | None) -> str | None:
    """The function a tool result answers, found through its call id among the calls before it
    (last match wins), for backends that name a result's function (Ollama, Gemini)."""
    for message in reversed(history):
        for call in message.tool_calls or ():
            if call.id == call_id and isinstance(call, ToolCall):
                return call.function.name
    return None


def shorten(vector: Any, dimensions: int, where: str, *, rescale: bool = False) -> list[float]:
    """`vector` with exactly `dimensions` values. Servers that ignore `dimensions` (Ollama before its
    support for it, 0.5.4 among them; OpenAI-compatible servers whose models cannot shorten) answer
    full-length vectors: those are cut and scaled back to unit length, as servers that apply it do
    (Ollama: normalize(embedding[:dimensions]); OpenAI's text-embedding-3 vectors are unit length).
    `rescale`: scale a vector of the right length too (Gemini cuts without rescaling)."""
    if not isinstance(vector, list) or not vector:
        raise UpstreamProtocol(f"{where} answered with an empty or malformed vector")
    if len(vector) < dimensions:
        raise InvalidRequest(
            f"{where} makes {len(vector)}-dimensional embeddings; 'dimensions' must be at most {len(vector)}",
            param="dimensions",
        )
    if len(vector) == dimensions and not rescale:  # the server applied `dimensions` itself
        return vector
    head = vector[:dimensions]
    try:
        norm = math.sqrt(math.fsum(value * value for value in head))
    except TypeError:
        raise UpstreamProtocol(f"{where} answered with a vector of non-numbers") from None
    scale = 1 / max(norm, 1e-12)  # Ollama's guard: a zero vector stays zero
    return [value * scale for value in head]


class Decoder(Protocol[T_co]):
    """An incremental decoder of a streamed body (NDJSON lines, SSE events)."""

    def feed(self, data: bytes) -> Iterable[T_co]: ...

    def flush(self) -> Iterable[T_co]: ...


# What parsing raises when a backend's JSON is valid but not of the shape its API documents (a
# string where an object belongs): the backend's fault (502), not the gateway's (500). Bytes that
# are not JSON at all are mapped with the transport's errors, by `upstream.translated`.
WRONG_SHAPE = (TypeError, AttributeError, KeyError, IndexError, ValueError)
MAPPED_ELSEWHERE = (GatewayError, orjson.JSONDecodeError, UnicodeDecodeError, LineTooLong)


def _wrong_shape(error: Exception) -> bool:
    return isinstance(error, WRONG_SHAPE) and not isinstance(error, MAPPED_ELSEWHERE)


def parsed(parse: Callable[[Any], R], answer: Any, who: str) -> R:
    """`parse(answer)`, with an answer of the wrong shape an UpstreamProtocol naming `who`."""
    try:
        return parse(answer)
    except WRONG_SHAPE as error:
        if not _wrong_shape(error):
            raise
        raise UpstreamProtocol(f"{who} answered with JSON of an unexpected shape") from None


async def batches(
    body: AsyncIterator[bytes],
    decoder: Decoder[T],
    parse: Callable[[T], list[Chunk]],
    who: str,
    ended: Callable[[], bool],
) -> AsyncGenerator[list[Chunk], None]:
    """A streamed body as `Provider.stream` yields it: the chunks of each read, as one list,
    except that the very first chunks go out on their own, ahead of whatever else their read
    carried (the first token's latency does not wait for the rest to be decoded). A malformed
    line or event raises its error after the chunks before it have been yielded; `who` (the
    backend's kind) is named when one is of the wrong shape. It stops after the read in which
    `ended()` turns true (the answer's end marker came), whether or not the body goes on."""
    first = True
    async for data in body:
        items = iter(decoder.feed(data))
        if first:
            chunks, error = _decoded(items, parse, who, first=True)
            if chunks:
                first = False
                yield chunks
            if error is not None:
                raise error
        chunks, error = _decoded(items, parse, who)
        if chunks:
            yield chunks
        if error is not None:
            raise error
        if ended():
            return
    chunks, error = _decoded(iter(decoder.flush()), parse, who)
    if chunks:
        yield chunks
    if error is not None:
        raise error


def _decoded(
    items: Iterator[T], parse: Callable[[T], list[Chunk]], who: str, *, first: bool = False
) -> tuple[list[Chunk], Exception | None]:
    """The chunks of `items` (with `first`, only up to the first item that makes any), and the
    error that stopped them, if one did."""
    chunks: list[Chunk] = []
    try:
        for item in items:
            chunks += parse(item)
            if first and chunks:
                break
    except Exception as error:
        if _wrong_shape(error):
            return chunks, UpstreamProtocol(f"{who} sent a stream event of an unexpected shape")
        return chunks, error
    return chunks, None


class Provider(Protocol):
    """One backend instance. Providers translate and do I/O; they record no metrics."""

    @property
    def backend(self) -> BackendConfig: ...

    async def complete(self, request: ChatRequest, model: str) -> Completion: ...

    def stream(self, request: ChatRequest, model: str) -> AsyncIterator[list[Chunk]]:
        """The answer as it comes: each item holds the chunks of one read of the backend's body
        (never none), so a backend that sends faster than one token per read is relayed in fewer,
        larger writes."""
        ...

    async def embed(self, request: EmbeddingRequest, model: str) -> Embeddings: ...

    async def list_models(self) -> list[ModelInfo]: ...

    def prepare(self, request: ChatRequest) -> Awaitable[object] | None:
        """What must be awaited before the backend is asked, outside its lease and deadlines, or
        None when nothing must: fetching the request's image URLs when the backend needs the bytes
        (kept for the request, so a retry or a fallback does not fetch them again)."""
        ...

    async def probe(self) -> None:
        """Raise an UpstreamError when the backend cannot serve."""
        ...

    async def loaded_models(self) -> list[str] | None:
        """Models in memory right now; None when the backend has no such notion."""
        ...

    def forwards(self, model: str) -> bool:
        """Whether the backend is known to pass `model`'s requests on to a service elsewhere (an
        Ollama cloud model), as far as it has learnt without asking."""
        ...


class Facts(Protocol):
    """What a backend says about one model; `failed_at`: when the lookup failed (monotonic), or None."""

    @property
    def failed_at(self) -> float | None: ...


F = TypeVar("F", bound=Facts)


def lookup(
    lookups: dict[str, asyncio.Task[F]], model: str, make: Callable[[str], Coroutine[Any, Any, F]]
) -> asyncio.Task[F]:
    """The lookup of what a backend says about `model` (Ollama's /api/show, Gemini's model entry):
    made once per model and shared by every request, and made again FACTS_RETRY seconds after one
    that failed (the server may only have been starting)."""
    found = lookups.get(model)
    if found is None or (
        found.done()
        and (failed_at := found.result().failed_at) is not None
        and time.monotonic() - failed_at >= FACTS_RETRY
    ):
        if found is None and len(lookups) >= FACTS_KEPT:
            _forget_oldest(lookups)
        found = lookups[model] = asyncio.create_task(make(model))
    return found


def _forget_oldest(lookups: dict[str, asyncio.Task[F]]) -> None:
    for model, task in lookups.items():  # in the order they were made
        if task.done():
            del lookups[model]
            return


async def looked_up(found: asyncio.Task[F]) -> F:
    # shielded: a request that goes away does not cancel the lookup the others share
    return found.result() if found.done() else await asyncio.shield(found)
