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
- `reasoning_effort` becomes `thinkingConfig` only for a model whose own entry
  (`GET /models/{model}`, asked once per model) says `thinking: true`: Gemini answers 400 to it
  for any other, so a model whose entry cannot be had gets none either.
- json_schema goes out as `responseJsonSchema`, translated to the keywords Gemini documents for it
  (gateway/providers/gemini/schema.py): a schema that cannot be is a 400, and constraints dropped
  from it are named in the `schema_dropped` notice.
- http(s) image URLs are fetched by the gateway (gateway/images.py, within `images:`'s limits) and
  sent as `inlineData` with the image host's content type, not as `fileData.fileUri`: only newer
  models fetch URLs themselves, and the gateway's limits then hold for every backend alike.
- A blocked prompt (`promptFeedback.blockReason`) is a 200 with one `content_filter` choice whose
  refusal says `blocked: <reason>` (contracts/gemini.md §10.1).
- When a stream's body ends, the choices that got no `finishReason` are finished as if with STOP
  (`stop`, or `tool_calls` after a call; contracts/gemini.md §10.2), as SSE has no end marker and
  the body's end is the answer's. A body cut off by the connection is an error all the same (the
  transport raises it), as is one that ends inside an event (`upstream_incomplete`), and one
  without any candidate too. Usage is the last `usageMetadata` seen.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from gateway.config import GeminiBackend
from gateway.errors import GatewayError, InvalidRequest, UpstreamProtocol
from gateway.images import Image, ImageFetcher, images_for
from gateway.providers.base import FACTS_TIMEOUT, batches, looked_up, lookup, parsed, shorten
from gateway.providers.gemini.request import build_request, json_schema, needs_thinking
from gateway.providers.gemini.response import (
    StreamState,
    error_from,
    finish_reason,
    parse_chunk,
    parse_response,
    usage,
)
from gateway.providers.gemini.schema import response_schema
from gateway.schemas import ChatRequest, Chunk, Completion, EmbeddingRequest, Embeddings, ModelInfo
from gateway.sse import Event, SSEDecoder
from gateway.upstream import Upstream

__all__ = [
    "GeminiProvider",
    "StreamState",
    "build_request",
    "error_from",
    "finish_reason",
    "model_info",
    "parse_chunk",
    "parse_response",
    "usage",
]

METHODS = {"generateContent": "completion", "embedContent": "embedding"}

# Inputs per batchEmbedContents call. Google's API refuses more: 400 INVALID_ARGUMENT "*
# BatchEmbedContentsRequest.requests: at most 100 requests can be in one batch" (seen in
# geldata/gel#9032, vercel/ai#16575); contracts/gemini.md does not state it.
EMBED_BATCH = 100


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What `GET /models/{model}` says about a model, as far as the translation uses it."""

    thinking: bool | None = None  # None: not known
    failed_at: float | None = None  # monotonic time the lookup failed: asked again after FACTS_RETRY


# A model's id as Gemini names them (`gemini-2.5-flash`, `text-embedding-004`), one path segment
# after `models/` or `tunedModels/`. The name goes into the request's URL path, so it is checked
# before: `gemini/x/../gemini-2.5-pro` under a pattern route would otherwise call another model than
# the one the API key's globs took (the https client drops the dot segments), and `?` or `#` would
# write the query of the gateway's own call.
_MODEL_ID = re.compile(r"(?:models/|tunedModels/)?[A-Za-z0-9][A-Za-z0-9._-]*")


def _resource(model: str) -> str:
    if not _MODEL_ID.fullmatch(model):
        raise InvalidRequest(
            f"{model!r} is not a Gemini model name: it may hold letters, digits, '-', '.' and '_' only"
            " (after 'models/' or 'tunedModels/').",
            param="model",
        )
    return model if model.startswith(("models/", "tunedModels/")) else "models/" + model


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
        self._facts: dict[str, asyncio.Task[ModelFacts]] = {}  # model -> its entry, asked once

    def prepare(self, request: ChatRequest) -> Awaitable[Mapping[str, Image]] | None:
        return None if self._images is None else self._images.for_request(request)

    async def complete(self, request: ChatRequest, model: str) -> Completion:
        path = f"/{_resource(model)}:generateContent"
        images = await images_for(self._images, request)
        thinks = await self._thinks(model) if needs_thinking(request) else None
        body = build_request(request, model, images=images, thinks=thinks)
        answer = await self._http.request("POST", path, body, model)
        completion = parsed(parse_response, answer, "Gemini")
        completion.notices.update(schema_notices(request))
        return completion

    async def stream(self, request: ChatRequest, model: str) -> AsyncIterator[list[Chunk]]:
        state = StreamState()
        decoder = SSEDecoder()
        path = f"/{_resource(model)}:streamGenerateContent?alt=sse"
        images = await images_for(self._images, request)
        thinks = await self._thinks(model) if needs_thinking(request) else None
        payload = build_request(request, model, images=images, thinks=thinks)

        def parse(event: Event) -> list[Chunk]:
            return state.parse_chunk(orjson.loads(event.data))

        async with self._http.stream(path, payload, model) as body:
            async for chunks in batches(
                body, decoder, parse, "Gemini", ended=lambda: False
            ):  # SSE: no marker
                yield chunks
        if decoder.cut:  # framed well, but its last event had not ended: what it held is lost
            raise UpstreamProtocol(
                f"Gemini at {self.backend.base_url} ended the stream in the middle of an event;"
                " the answer may be incomplete",
                code="upstream_incomplete",
            )
        closing = state.close()  # the body ended cleanly: one cut off raised above
        if notices := schema_notices(request):
            closing.append(Chunk(notices=notices))
        if closing:
            yield closing

    async def _thinks(self, model: str) -> bool | None:
        """Whether the model thinks, from its entry (base.lookup: once per model)."""
        return (await looked_up(lookup(self._facts, model, self._entry))).thinking

    async def _entry(self, model: str) -> ModelFacts:
        """A lookup that fails, or that Gemini leaves unanswered (the transport bounds only the
        connect), has failed."""
        try:
            async with asyncio.timeout(FACTS_TIMEOUT):
                entry = await self._http.request("GET", f"/{_resource(model)}", None, model)
        except (GatewayError, TimeoutError):
            entry = None
        if not isinstance(entry, dict):
            return ModelFacts(failed_at=time.monotonic())
        return ModelFacts(thinking=bool(entry.get("thinking")))  # proto3 JSON leaves a false one out

    async def embed(self, request: EmbeddingRequest, model: str) -> Embeddings:
        texts = [request.input] if isinstance(request.input, str) else request.input
        if not texts or not all(isinstance(text, str) for text in texts):
            raise InvalidRequest("Gemini backends take text input, not token arrays", param="input")
        resource = _resource(model)
        one: dict[str, Any] = {"model": resource}
        if request.dimensions is not None:
            one["outputDimensionality"] = request.dimensions
        vectors: list[list[float]] = []
        tokens, counted = 0, True
        for start in range(0, len(texts), EMBED_BATCH):  # one call per batch, in order
            batch = texts[start : start + EMBED_BATCH]
            body = {"requests": [{**one, "content": {"parts": [{"text": text}]}} for text in batch]}
            answer = await self._http.request("POST", f"/{resource}:batchEmbedContents", body, model)
            found = answer.get("embeddings") if isinstance(answer, dict) else None
            if not isinstance(found, list) or len(found) != len(batch):
                raise UpstreamProtocol(
                    f"Gemini at {self.backend.base_url} answered batchEmbedContents without one vector"
                    " per input"
                )
            vectors += [list(e.get("values") or []) if isinstance(e, dict) else [] for e in found]
            tokens += usage(answer.get("usageMetadata")).prompt_tokens
            counted = counted and isinstance(answer.get("usageMetadata"), dict)  # as a rule, none
        if request.dimensions is not None:  # outputDimensionality cuts, and leaves the rescaling to us
            where = f"'{model}' on Gemini"
            vectors = [shorten(vector, request.dimensions, where, rescale=True) for vector in vectors]
        return Embeddings(vectors, tokens, counted=counted)

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

    def forwards(self, model: str) -> bool:
        return False

    async def probe(self) -> None:
        await self._http.request("GET", "/models?pageSize=1")


def schema_notices(request: ChatRequest) -> dict[str, str]:
    """The constraints of the response_format schema that `responseJsonSchema` could not take."""
    schema = json_schema(request)
    dropped = response_schema(schema)[1] if schema is not None else []
    return {"schema_dropped": ",".join(dropped)} if dropped else {}


def model_info(entry: Any) -> ModelInfo | None:
    """A listed model the gateway can use (it generates or embeds), or None."""
    methods = entry.get("supportedGenerationMethods") or () if isinstance(entry, dict) else ()
    capabilities = [name for method, name in METHODS.items() if method in methods]
    if not capabilities:
        return None
    capabilities += ["thinking"] if entry.get("thinking") else []
    name = str(entry.get("name") or "").removeprefix("models/")
    return ModelInfo(id=name, owned_by="google", remote=True, capabilities=tuple(capabilities))
