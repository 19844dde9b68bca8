"""A fake Gemini (native v1beta API) scripted with the same `Reply` values as the other fakes.

`generateContent`, `streamGenerateContent?alt=sse` (no [DONE]: the body just ends; the last event
carries finishReason and usage), `batchEmbedContents`, the model list and each model's entry (with
`thinking: true` for a model that thinks; a thinkingConfig for any other is a 400, as in Gemini).
The key must come in the `x-goog-api-key` header; errors use Google's `{"error": {code, message,
status}}` shape.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.ollama_server import FakeOllama, Reply

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def _error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> Response:
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": STATUS_NAMES.get(status, "UNKNOWN"),
    }
    if details:
        error["details"] = details
    return _json({"error": error}, status)


class FakeGemini:
    def __init__(
        self, models: list[str] | None = None, api_key: str = "gm-test-key", thinking: list[str] | None = None
    ) -> None:
        self.models = models or ["gemini-2.5-flash", "gemini-embedding-001"]
        # the models that think; by default every one that generates
        self.thinking = [m for m in self.models if "embed" not in m] if thinking is None else thinking
        self.entry_status: int | None = None  # set: a model's entry answers this error
        self.api_key = api_key
        self.replies: deque[Reply] = deque()
        self.default = Reply()  # the answer when nothing is queued
        self.requests: list[tuple[str, Any, dict[str, str]]] = []
        self.cancelled = 0
        self._vectors = FakeOllama(embed_dim=4)
        self.app = Starlette(
            routes=[
                Route("/v1beta/models", self.list_models, methods=["GET"]),
                Route("/v1beta/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/v1beta/models/{call:path}", self.call, methods=["POST"]),
            ]
        )

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def chat_bodies(self) -> list[dict[str, Any]]:
        return [body for path, body, _ in self.requests if "Content" in path and "Embed" not in path]

    def vector(self, text: str) -> list[float]:
        return self._vectors.vector(text)

    def _denied(self, request: Request) -> Response | None:
        """As Gemini: no key is a 403; a wrong one a 400 whose ErrorInfo says API_KEY_INVALID."""
        key = request.headers.get("x-goog-api-key")
        if key is None:
            return _error(
                403, "Method doesn't allow unregistered callers (callers without established identity)."
            )
        if key != self.api_key:
            reason = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
            return _error(400, "API key not valid. Please pass a valid API key.", [reason])
        return None

    async def list_models(self, request: Request) -> Response:
        self.requests.append((request.url.path, None, dict(request.headers)))
        if denied := self._denied(request):
            return denied
        return _json({"models": [self._entry(m) for m in self.models]})

    def _entry(self, model: str) -> dict[str, Any]:
        methods = {True: ["embedContent"], False: ["generateContent", "countTokens"]}
        entry = {
            "name": f"models/{model}",
            "displayName": model,
            "supportedGenerationMethods": methods["embed" in model],
        }
        return entry | ({"thinking": True} if model in self.thinking else {})  # proto3 JSON omits false

    async def get_model(self, request: Request) -> Response:
        self.requests.append((request.url.path, None, dict(request.headers)))
        if denied := self._denied(request):
            return denied
        model = request.path_params["model"]
        if self.entry_status is not None:
            return _error(self.entry_status, "The service is currently unavailable.")
        if model not in self.models:
            return _error(404, f"models/{model} is not found for API version v1beta.")
        return _json(self._entry(model))

    async def call(self, request: Request) -> Response:
        raw = await request.body()
        body = orjson.loads(raw) if raw else None
        self.requests.append((request.url.path, body, dict(request.headers)))
        if denied := self._denied(request):
            return denied
        model, _, method = request.path_params["call"].partition(":")
        if model not in self.models:
            return _error(
                404, f"models/{model} is not found for API version v1beta, or is not supported for {method}."
            )
        if method == "batchEmbedContents":
            return self._embed(body)
        thinking = ((body or {}).get("generationConfig") or {}).get("thinkingConfig")
        if thinking is not None and model not in self.thinking:
            return _error(400, "Thinking is not supported by this model.")
        reply = self.replies.popleft() if self.replies else self.default
        if reply.delay_first:
            await asyncio.sleep(reply.delay_first)
        if reply.status is not None:
            retry = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]
            return _error(reply.status, reply.error_text, retry if reply.status == 429 else None)
        if reply.garbage:
            return Response(b"<html>502 Bad Gateway</html>", media_type="text/event-stream")
        if method == "streamGenerateContent":
            if request.query_params.get("alt") != "sse":
                return _error(400, "this fake only streams with alt=sse")
            return StreamingResponse(self._events(model, reply), media_type="text/event-stream")
        if method != "generateContent":
            return _error(404, f"unknown method {method}")
        parts: list[dict[str, Any]] = (
            [{"text": "".join(reply.stream_pieces())}] if reply.stream_pieces() else []
        )
        parts += self._calls(reply)
        return _json(self._response(model, parts, reply, final=True))

    @staticmethod
    def _calls(reply: Reply) -> list[dict[str, Any]]:
        return [
            {"functionCall": {"name": c["function"]["name"], "args": c["function"]["arguments"]}}
            for c in reply.tool_calls or []
        ]

    @staticmethod
    def _response(model: str, parts: list[dict[str, Any]], reply: Reply, *, final: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"index": 0}
        if parts:
            candidate["content"] = {"role": "model", "parts": parts}
        completion = len(reply.stream_pieces()) if reply.eval_count is None else reply.eval_count
        usage: dict[str, int] = {"promptTokenCount": reply.prompt_eval_count}
        if final:
            candidate["finishReason"] = "MAX_TOKENS" if reply.done_reason == "length" else "STOP"
            usage.update(
                candidatesTokenCount=completion, totalTokenCount=reply.prompt_eval_count + completion
            )
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": "r1"}

    async def _events(self, model: str, reply: Reply) -> AsyncIterator[bytes]:
        def event(payload: dict[str, Any]) -> bytes:
            return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"

        try:
            pieces = reply.stream_pieces()
            for i, piece in enumerate(pieces):
                if reply.error_after is not None and i == reply.error_after:
                    yield event({"error": {"code": 500, "message": reply.error_text, "status": "INTERNAL"}})
                    return
                if i and reply.delay_between:
                    await asyncio.sleep(reply.delay_between)
                data = event(self._response(model, [{"text": piece}], reply, final=False))
                if reply.cut_last and i == len(pieces) - 1:
                    yield data[: len(data) // 2]
                    return
                yield data
            if reply.omit_done:
                return
            yield event(self._response(model, self._calls(reply), reply, final=True))
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    def _embed(self, body: Any) -> Response:
        # Google's limit, which contracts/gemini.md does not state: its API answers more requests
        # with this 400 (quoted in geldata/gel#9032 and vercel/ai#16575).
        if len(body["requests"]) > 100:
            return _error(
                400, "* BatchEmbedContentsRequest.requests: at most 100 requests can be in one batch\n"
            )
        texts = [" ".join(p.get("text", "") for p in r["content"]["parts"]) for r in body["requests"]]
        return _json({"embeddings": [{"values": self.vector(text)} for text in texts]})
