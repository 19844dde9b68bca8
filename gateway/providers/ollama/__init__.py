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
import re
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from gateway.config import OllamaBackend
from gateway.errors import GatewayError, InvalidRequest, UpstreamProtocol
from gateway.images import Image, ImageFetcher, images_for
from gateway.ndjson import NDJSONDecoder
from gateway.providers.base import FACTS_TIMEOUT, batches, looked_up, lookup, parsed, shorten
from gateway.providers.ollama.request import build_request, needs_capabilities
from gateway.providers.ollama.response import (
    StreamState,
    error_from,
    finish_reason,
    parse_chunk,
    parse_response,
    usage,
)
from gateway.schemas import ChatRequest, Chunk, Completion, EmbeddingRequest, Embeddings, ModelInfo, Usage
from gateway.upstream import Upstream, let_end

__all__ = [
    "OllamaProvider",
    "StreamState",
    "build_request",
    "error_from",
    "finish_reason",
    "model_info",
    "parse_chunk",
    "parse_response",
    "usage",
]

PROMPT_TRUNCATED = "prompt_truncated"  # notice key; its value is the context size in tokens
NUM_CTX = re.compile(r"^num_ctx\s+(\d+)", re.MULTILINE)
CONTEXT_WAIT = 1.0  # seconds a finished answer waits for its model's context size, if still unknown


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What /api/show says about a model, as far as the translation uses it."""

    context_size: int | None = None
    capabilities: frozenset[str] | None = None  # None: not reported (older servers, 0.5.4 too)
    remote: bool = False  # a cloud model: Ollama forwards it to its hosted service
    failed_at: float | None = None  # monotonic time the lookup failed: asked again after FACTS_RETRY


def model_facts(show: Any) -> ModelFacts:
    """The facts in an /api/show answer."""
    if not isinstance(show, dict):
        return ModelFacts()
    match = NUM_CTX.search(str(show.get("parameters") or ""))
    listed = show.get("capabilities")
    return ModelFacts(
        context_size=int(match.group(1)) if match else None,
        capabilities=frozenset(map(str, listed)) if isinstance(listed, list) else None,
        remote=bool(show.get("remote_host") or show.get("remote_model")),
    )


def created_at(value: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(value)).timestamp())
    except ValueError:
        return 0


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

    async def complete(self, request: ChatRequest, model: str) -> Completion:
        images = await images_for(self._images, request)
        capabilities = await self._capabilities(model) if needs_capabilities(request) else None
        body = build_request(request, model, stream=False, images=images, capabilities=capabilities)
        answer = await self._http.request("POST", "/api/chat", body, model)
        completion = parsed(parse_response, answer, "Ollama")
        completion.notices.update(await self._truncation(model, body, completion.usage))
        return completion

    def _facts_of(self, model: str) -> asyncio.Task[ModelFacts]:
        """The lookup of the model's /api/show (base.lookup: once per model)."""
        return lookup(self._facts, model, self._show)

    async def _capabilities(self, model: str) -> frozenset[str] | None:
        return (await looked_up(self._facts_of(model))).capabilities

    def _context_size_of(self, model: str, body: dict[str, Any]) -> int | asyncio.Task[ModelFacts]:
        """The request's own num_ctx, or the lookup of the model's."""
        size = (body.get("options") or {}).get("num_ctx")
        return size if isinstance(size, int) else self._facts_of(model)

    async def _truncation(self, model: str, body: dict[str, Any], used: Usage) -> dict[str, str]:
        """Ollama cuts a prompt longer than the context without an error (HTTP 200); the only trace is
        a prompt count equal to the context size. Say so, when the context size can be known
        within CONTEXT_WAIT seconds of the answer's end: the answer is not held up longer."""
        if not used.prompt_tokens:
            return {}
        size: int | asyncio.Task[ModelFacts] | None = self._context_size_of(model, body)
        if isinstance(size, asyncio.Task):
            if size.done():  # known since an earlier answer: no wait to set up
                size = size.result().context_size
            else:
                try:
                    size = (await asyncio.wait_for(asyncio.shield(size), CONTEXT_WAIT)).context_size
                except TimeoutError:
                    return {}  # the lookup goes on, for the next answer
        if size is None or used.prompt_tokens < size:
            return {}
        return {PROMPT_TRUNCATED: str(size)}

    async def _show(self, model: str) -> ModelFacts:
        """The model's facts; a lookup that fails, or that the backend leaves unanswered (the
        transport bounds only the connect), has failed: it is asked again after FACTS_RETRY."""
        try:
            async with asyncio.timeout(FACTS_TIMEOUT):
                return model_facts(await self._http.request("POST", "/api/show", {"model": model}, model))
        except (GatewayError, TimeoutError):
            return ModelFacts(failed_at=time.monotonic())

    async def stream(self, request: ChatRequest, model: str) -> AsyncIterator[list[Chunk]]:
        state = StreamState()
        decoder = NDJSONDecoder()
        images = await images_for(self._images, request)
        capabilities = await self._capabilities(model) if needs_capabilities(request) else None
        payload = build_request(request, model, stream=True, images=images, capabilities=capabilities)
        begun = False
        async with (
            self._http.stream("/api/chat", payload, model) as body,
            aclosing(batches(body, decoder, state.parse_chunk, "Ollama", lambda: state.done)) as reads,
        ):
            async for chunks in reads:
                if not begun:  # the answer has begun: the model's context size is looked up meanwhile
                    begun = True
                    self._context_size_of(model, payload)
                yield chunks
            if state.done:  # the answer is whole, whether or not its body has ended
                let_end(body)
        used = state.usage
        if used is not None and (notices := await self._truncation(model, payload, used)):
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
        count = answer.get("prompt_eval_count")  # may be missing (contracts/ollama.md §4)
        return Embeddings(vectors, int(count or 0), counted=count is not None)

    async def list_models(self) -> list[ModelInfo]:
        body = await self._http.request("GET", "/api/tags")
        models = body.get("models") if isinstance(body, dict) else None
        return [model_info(entry) for entry in models or [] if isinstance(entry, dict)]

    async def remote(self, model: str) -> bool | None:
        """Whether Ollama forwards the model to its hosted service, from its /api/show (asked once,
        as for the capabilities); None when that could not be learned."""
        facts = await looked_up(self._facts_of(model))
        return None if facts.failed_at is not None else facts.remote

    def forwards(self, model: str) -> bool:
        """Known from the model's /api/show, which every answer with a prompt count has asked."""
        found = self._facts.get(model)
        return found is not None and found.done() and found.result().remote

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
