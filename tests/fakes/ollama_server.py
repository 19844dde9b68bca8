"""A fake Ollama: a real HTTP server speaking the native API as contracts/ollama.md describes it.

Tests script its answers with `Reply` values (FIFO; a default reply when none is queued) and read
back what it received. Streaming is the default when `stream` is absent, as in real Ollama; zero
counts are left out of the final line (Go's omitempty); errors are `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import string
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeGuard

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Reply:
    content: str = "Hello there!"
    pieces: list[str] | None = None  # stream pieces; default: the content split after spaces
    tool_calls: list[dict[str, Any]] | None = None  # native form: {"function": {"name", "arguments": {...}}}
    thinking: str | None = None
    done_reason: str | None = "stop"
    prompt_eval_count: int = 12
    eval_count: int | None = None  # default: number of pieces
    status: int | None = None  # answer this status with {"error": error_text} instead
    error_text: str = "an error was encountered while running the model"
    error_after: int | None = None  # stream: write an error line after N pieces
    omit_done: bool = False  # stream ends without the done line
    delay_first: float = 0.0
    delay_between: float = 0.0
    id_missing: bool = False
    garbage: bool = False  # answer 200 with a body that is not the protocol
    usage_missing: bool = False  # OpenAI-compatible: no usage at all (a server that ignores stream_options)
    finish_missing: bool = False  # OpenAI-compatible stream: [DONE] comes with no finish_reason before it
    cut_last: bool = False  # Gemini stream: the body ends cleanly half-way through its last event
    held_open: float = 0.0  # stream: seconds the body stays open after its end marker (done, [DONE])
    delay_done: float = 0.0  # OpenAI stream: seconds before [DONE], so that it comes in a read of its own

    def stream_pieces(self) -> list[str]:
        if self.pieces is not None:
            return self.pieces
        words = self.content.split(" ")
        return [w + " " for w in words[:-1]] + [words[-1]] if self.content else []


# Ollama's `options` keys and their Go types (api.Options and api.Runner; Options.FromMap). A value of
# another type is a 500, from both 0.5.4 and newer servers: the check runs where the model is
# scheduled, and handleScheduleError answers anything it does not know with 500.
_INT, _FLOAT, _BOOL = "integer", "float32", "boolean"
OPTION_TYPES = {
    **dict.fromkeys(("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "mirostat", "num_ctx",
                     "num_batch", "num_gpu", "main_gpu", "num_thread"), _INT),
    **dict.fromkeys(("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                     "frequency_penalty", "mirostat_tau", "mirostat_eta"), _FLOAT),
    **dict.fromkeys(("penalize_newline", "use_mmap", "low_vram", "f16_kv", "vocab_only", "use_mlock"), _BOOL),
    "stop": "array",
}  # fmt: skip


def option_error(options: Any) -> str | None:
    """Ollama's words for the first wrongly typed option (None: all fit; unknown keys are ignored)."""
    for key, value in (options if isinstance(options, dict) else {}).items():
        kind = OPTION_TYPES.get(key)
        if kind is None or value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (kind in (_INT, _FLOAT) and not number) or (kind == _BOOL and not isinstance(value, bool)):
            return f'option "{key}" must be of type {kind}'
        if kind == "array" and not isinstance(value, list):
            return f'option "{key}" must be of type array'
        if kind == "array" and not all(isinstance(item, str) for item in value):
            return f'option "{key}" must be of an array of strings'
    return None


DURATION = re.compile(r"[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")


def keep_alive_error(value: Any) -> str | None:
    """Ollama's words for a `keep_alive` that is not seconds nor a Go duration (api.Duration)."""
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return None
    if not isinstance(value, str):
        kind = {bool: "bool", dict: "map[string]interface {}", list: "[]interface {}"}[type(value)]
        return f"Unsupported type: '{kind}'"
    if value in ("0", "+0", "-0") or DURATION.fullmatch(value):
        return None
    if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", value):
        return f'time: missing unit in duration "{value}"'
    if unit := re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([^\d.]+)", value):
        return f'time: unknown unit "{unit.group(3)}" in duration "{value}"'
    return f'time: invalid duration "{value}"'


JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def format_error(fmt: Any) -> str | None:
    """Ollama's words for a `format` it cannot use: not "json" nor an object; or a schema llama.cpp
    cannot turn into a grammar (here: an unknown type, or a `$ref` to no definition in it)."""
    if fmt is None or fmt in ("json", ""):
        return None
    if not isinstance(fmt, dict):
        quoted = orjson.dumps(fmt).decode().replace("\\", "\\\\").replace('"', '\\"')
        return f'invalid format: "{quoted}"; expected "json" or a valid JSON Schema object'
    definitions = {**(fmt.get("$defs") or {}), **(fmt.get("definitions") or {})}

    def usable(schema: Any) -> bool:
        if not isinstance(schema, dict):
            return True
        kinds = schema.get("type")
        if kinds is not None and not set(kinds if isinstance(kinds, list) else [kinds]) <= JSON_TYPES:
            return False
        ref = schema.get("$ref")
        if ref is not None and str(ref).rsplit("/", 1)[-1] not in definitions:
            return False
        named = [schema.get(key) or {} for key in ("properties", "$defs", "definitions")]
        inner = [value for group in named for value in group.values()]
        inner += [schema.get(key) for key in ("items", "additionalProperties", "not")]
        inner += [
            value for key in ("anyOf", "oneOf", "allOf", "prefixItems") for value in schema.get(key) or []
        ]
        return all(map(usable, inner))

    return None if usable(fmt) else "invalid JSON schema in format"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def _error(status: int, text: str) -> Response:
    return _json({"error": text}, status)


class FakeOllama:
    def __init__(
        self,
        models: list[str] | None = None,
        loaded: list[str] | None = None,
        cloud: list[str] | None = None,
        embed_dim: int = 4,
        thinking: list[str] | None = None,
    ) -> None:
        self.models = [self._full(m) for m in (models or ["llama3.2:latest"])]
        # the models with the `thinking` capability; `think` for any other is a 400, as in Ollama
        self.thinking = [self._full(m) for m in (thinking or [])]
        self.loaded = [self._full(m) for m in (loaded or [])]
        self.cloud = [self._full(m) for m in (cloud or [])]
        self.embed_dim = embed_dim
        self.replies: deque[Reply] = deque()
        self.default = Reply()  # the answer when nothing is queued
        self.requests: list[tuple[str, Any]] = []
        self.cancelled = 0
        self.completed_streams = 0
        self.embed_delay = 0.0  # seconds before each /api/embed answer
        self.embed_counts = True  # False: /api/embed answers without prompt_eval_count, which may be missing
        self.embed_short = False  # True: a faulty /api/embed that answers one vector fewer than asked
        self.app = Starlette(
            routes=[
                Route("/api/chat", self.chat, methods=["POST"]),
                Route("/api/embed", self.embed, methods=["POST"]),
                Route("/api/tags", self.tags, methods=["GET"]),
                Route("/api/ps", self.ps, methods=["GET"]),
                Route("/api/show", self.show, methods=["POST"]),
                Route("/api/version", self.version, methods=["GET", "HEAD"]),
            ]
        )

    @staticmethod
    def _full(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def chat_bodies(self) -> list[dict[str, Any]]:
        return [body for path, body in self.requests if path == "/api/chat"]

    async def _body(self, request: Request) -> Any:
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        self.requests.append((request.url.path, body))
        return body

    def _known(self, name: object) -> TypeGuard[str]:
        return isinstance(name, str) and self._full(name) in self.models + self.cloud

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        if not isinstance(body, dict):
            return _error(400, "missing request body")
        if undecodable := self._undecodable(body):  # Go's JSON decoding: before anything else
            return _error(400, undecodable)
        if wrong_duration := keep_alive_error(body.get("keep_alive")):
            return _error(400, wrong_duration)
        model = body.get("model")
        if not model:
            return _error(400, "model is required")
        if not self._known(model):
            return _error(404, f'model "{model}" not found, try pulling it first')
        if body.get("think") not in (None, False) and self._full(model) not in self.thinking:
            return _error(400, f'"{model}" does not support thinking')
        # Where the model is scheduled, then where its runner starts: both a 500 (see OPTION_TYPES).
        if wrong := option_error(body.get("options")) or format_error(body.get("format")):
            return _error(500, wrong)
        reply = self.replies.popleft() if self.replies else self.default
        if reply.delay_first:
            await asyncio.sleep(reply.delay_first)
        if reply.status is not None:
            return _error(reply.status, reply.error_text)
        if reply.garbage:
            return Response(b"<html>502 Bad Gateway</html>\n", media_type="application/x-ndjson")
        if body.get("stream", True):
            return StreamingResponse(self._lines(model, reply), media_type="application/x-ndjson")
        message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.stream_pieces())}
        if reply.thinking:
            message["thinking"] = reply.thinking
        if reply.tool_calls:
            message["tool_calls"] = self._calls(reply)
        return _json({"model": model, "created_at": _now(), "message": message, **self._final(reply)})

    @staticmethod
    def _undecodable(body: dict[str, Any]) -> str | None:
        for sent in body.get("messages") or []:
            if any(str(image).startswith("data:") for image in sent.get("images") or []):
                return "illegal base64 data at input byte 4"
            for call in sent.get("tool_calls") or []:
                arguments = (call.get("function") or {}).get("arguments")
                if not isinstance(arguments, dict):  # Go decodes them into a map
                    kind = {list: "array", str: "string", bool: "bool"}.get(type(arguments), "number")
                    return (
                        f"json: cannot unmarshal {kind} into Go struct field ChatRequest.messages"
                        " of type api.ToolCallFunctionArguments"
                    )
        return None

    def _calls(self, reply: Reply) -> list[dict[str, Any]]:
        alphabet = string.ascii_lowercase + string.digits
        calls: list[dict[str, Any]] = []
        for index, call in enumerate(reply.tool_calls or []):
            native: dict[str, Any] = {"function": {"index": index, **call["function"]}}
            if not reply.id_missing:
                native["id"] = "call_" + "".join(secrets.choice(alphabet) for _ in range(8))
            calls.append(native)
        return calls

    def _final(self, reply: Reply) -> dict[str, Any]:
        final: dict[str, Any] = {"done": True}
        if reply.done_reason is not None:
            final["done_reason"] = reply.done_reason
        eval_count = len(reply.stream_pieces()) if reply.eval_count is None else reply.eval_count
        counts = {
            "total_duration": 4_883_583_458,
            "load_duration": 1_334_875,
            "prompt_eval_count": reply.prompt_eval_count,
            "prompt_eval_duration": 342_546_000,
            "eval_count": eval_count,
            "eval_duration": 4_535_599_000,
        }
        final.update({key: value for key, value in counts.items() if value})
        return final

    async def _lines(self, model: str, reply: Reply) -> AsyncIterator[bytes]:
        def line(message: dict[str, Any], **extra: Any) -> bytes:
            payload = {"model": model, "created_at": _now(), "message": {"role": "assistant", **message}}
            return orjson.dumps({**payload, "done": False, **extra}) + b"\n"

        try:
            if reply.thinking:
                yield line({"content": "", "thinking": reply.thinking})
            for i, piece in enumerate(reply.stream_pieces()):
                if reply.error_after is not None and i == reply.error_after:
                    yield orjson.dumps({"error": reply.error_text}) + b"\n"
                    return
                if i and reply.delay_between:
                    await asyncio.sleep(reply.delay_between)
                yield line({"content": piece})
            if reply.tool_calls:
                yield line({"content": "", "tool_calls": self._calls(reply)})
            if not reply.omit_done:
                final = line({"content": ""})
                yield orjson.dumps({**orjson.loads(final), **self._final(reply)}) + b"\n"
            self.completed_streams += 1
            if reply.held_open:
                await asyncio.sleep(reply.held_open)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    async def embed(self, request: Request) -> Response:
        body = await self._body(request)
        model = (body or {}).get("model")
        if not self._known(model):
            return _error(404, f'model "{model}" not found, try pulling it first')
        if "embed" not in str(model):
            return _error(400, f"{self._full(str(model))} does not support embedding")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            return _error(400, "invalid input type")
        if self.embed_delay:
            await asyncio.sleep(self.embed_delay)
        vectors = [self.vector(text) for text in inputs]
        if self.embed_short:
            vectors.pop()
        words = sum(len(text.split()) for text in inputs)
        answer = {
            "model": model,
            "embeddings": vectors,
            "total_duration": 14143917,
            "prompt_eval_count": words,
        }
        if not self.embed_counts:
            del answer["prompt_eval_count"]
        return _json(answer)

    def vector(self, text: str) -> list[float]:
        """The deterministic embedding the fake returns for `text`."""
        digest = hashlib.sha256(text.encode()).digest()
        return [round((digest[i] - 128) / 128, 6) for i in range(self.embed_dim)]

    def _entry(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": name,
            "model": name,
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
            "size": 2019393189,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {
                "format": "gguf",
                "family": "llama",
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        }
        if name in self.cloud:
            entry.update(remote_model=name.split(":", maxsplit=1)[0], remote_host="https://ollama.com:443")
        return entry

    async def tags(self, request: Request) -> Response:
        self.requests.append((request.url.path, None))
        return _json({"models": [self._entry(name) for name in self.models + self.cloud]})

    async def ps(self, request: Request) -> Response:
        self.requests.append((request.url.path, None))
        models = [
            {
                **self._entry(name),
                "expires_at": "2099-01-01T00:00:00Z",
                "size_vram": 0,
                "context_length": 4096,
            }
            for name in self.loaded
        ]
        return _json({"models": models})

    async def show(self, request: Request) -> Response:
        body = await self._body(request) or {}
        name = body.get("model") or body.get("name")
        if not self._known(name):
            return _error(404, f"model '{name}' not found")
        entry = self._entry(self._full(name))
        info = {
            "details": entry["details"],
            "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
        }
        info["capabilities"] = [
            "completion",
            "tools",
            *(["thinking"] if self._full(name) in self.thinking else []),
        ]
        info.update({k: entry[k] for k in ("remote_model", "remote_host") if k in entry})
        return _json(info)

    async def version(self, request: Request) -> Response:
        self.requests.append((request.url.path, None))
        return _json({"version": "0.12.0"})
