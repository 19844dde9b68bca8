"""A fake OpenAI-compatible server (as vLLM or llama.cpp's server speak it), scripted with the same
`Reply` values as the fake Ollama so one scenario table can run against every backend."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.ollama_server import FakeOllama, Reply


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


class FakeOpenAI:
    def __init__(
        self, models: list[str] | None = None, api_key: str | None = None, embeddings: bool = True
    ) -> None:
        self.models = models or ["gpt-4o-mini", "text-embedding-3-small"]
        self.api_key = api_key
        self.embeddings_served = embeddings  # False: as llama.cpp's server started without --embeddings
        self.context_size: int | None = None  # a prompt of more words: a 400 for it, in the words of
        self.context_server = "llama.cpp"  # llama.cpp's server, or "vllm"
        # True: errors at the top level of the body ({"object": "error", "message": ...}), not under
        # "error", as SGLang, FastChat and older vLLM releases write them
        self.errors_at_top = False
        self.replies: deque[Reply] = deque()
        self.default = Reply()  # the answer when nothing is queued
        self.requests: list[tuple[str, Any, dict[str, str]]] = []
        self.cancelled = 0
        self._vectors = FakeOllama(embed_dim=4)  # the same deterministic vectors as the fake Ollama
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
            ]
        )

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def chat_bodies(self) -> list[dict[str, Any]]:
        return [body for path, body, _ in self.requests if path == "/v1/chat/completions"]

    def vector(self, text: str) -> list[float]:
        return self._vectors.vector(text)

    @staticmethod
    def text_of(item: str | list[int]) -> str:
        """What a vector is made from: the text, or token ids written out (`1 2 3`)."""
        return item if isinstance(item, str) else " ".join(map(str, item))

    async def _record(self, request: Request) -> Any:
        raw = await request.body()
        body = orjson.loads(raw) if raw else None
        self.requests.append((request.url.path, body, dict(request.headers)))
        return body

    def _denied(self, request: Request) -> Response | None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            error = {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": None,
                     "code": "invalid_api_key"}  # fmt: skip
            return _json({"error": error}, 401)
        return None

    async def chat(self, request: Request) -> Response:
        body = await self._record(request)
        if denied := self._denied(request):
            return denied
        model = body.get("model")
        if model not in self.models:
            error = {"message": f"The model `{model}` does not exist or you do not have access to it.",
                     "type": "invalid_request_error", "param": None, "code": "model_not_found"}  # fmt: skip
            return _json({"error": error}, 404)
        if (overflow := self._overflow(body)) is not None:
            return _json({"object": "error", **overflow} if self.errors_at_top else {"error": overflow}, 400)
        reply = self.replies.popleft() if self.replies else self.default
        if reply.delay_first:
            await asyncio.sleep(reply.delay_first)
        if reply.status is not None:
            error = {"message": reply.error_text, "type": "server_error", "param": None, "code": None}
            headers = {"retry-after": "7"} if reply.status == 429 else None
            return _json({"error": error}, reply.status, headers)
        if reply.garbage:
            return Response(b"<html>502 Bad Gateway</html>", media_type="text/event-stream")
        if body.get("stream"):
            return StreamingResponse(self._events(model, reply, body), media_type="text/event-stream")
        return _json(self._completion(model, reply, body))

    def _overflow(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """llama.cpp's (or vLLM's) answer to a prompt longer than its context (a word counted as a token)."""
        words = sum(len(str(message.get("content") or "").split()) for message in body.get("messages") or [])
        if self.context_size is None or words <= self.context_size:
            return None
        if self.context_server == "vllm":
            return {"message": f"This model's maximum context length is {self.context_size} tokens."
                    f" However, your request has {words} input tokens. Please reduce the length of the"
                    " input messages.", "type": "BadRequestError", "param": None, "code": 400}  # fmt: skip
        return {"code": 400, "message": f"request ({words} tokens) exceeds the available context size"
                f" ({self.context_size} tokens), try increasing it", "type": "exceed_context_size_error",
                "n_prompt_tokens": words, "n_ctx": self.context_size}  # fmt: skip

    @staticmethod
    def _calls(reply: Reply) -> list[dict[str, Any]]:
        calls = []
        for i, call in enumerate(reply.tool_calls or []):
            arguments = orjson.dumps(call["function"]["arguments"]).decode()
            function = {"name": call["function"]["name"], "arguments": arguments}
            calls.append({"id": f"call_up{i}", "type": "function", "function": function})
        return calls

    @staticmethod
    def _logprob(body: dict[str, Any], position: int, piece: str) -> dict[str, Any]:
        """A piece's entry of `logprobs.content`, as if it were one token, with the `top_logprobs`
        alternatives asked for (the token itself first)."""
        logprob = -0.5 * (position + 1)
        alternatives = [{"token": piece, "logprob": logprob, "bytes": list(piece.encode())}]
        alternatives += [{"token": f"alt{k}", "logprob": logprob - k - 1, "bytes": None} for k in range(19)]
        top = body.get("top_logprobs") or 0
        return {**alternatives[0], "top_logprobs": alternatives[:top]}

    @staticmethod
    def _usage(reply: Reply, choices: int = 1) -> dict[str, int]:
        completion = len(reply.stream_pieces()) if reply.eval_count is None else reply.eval_count
        completion *= choices
        return {"prompt_tokens": reply.prompt_eval_count, "completion_tokens": completion,
                "total_tokens": reply.prompt_eval_count + completion}  # fmt: skip

    def _finish(self, reply: Reply) -> str | None:
        if reply.done_reason == "length":  # OpenAI: cut by max_tokens, calls or not
            return "length"
        return "tool_calls" if reply.tool_calls else "stop"

    def _completion(self, model: str, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.stream_pieces()) or None}
        if reply.tool_calls:
            message["tool_calls"] = self._calls(reply)
        logprobs = None
        if body.get("logprobs"):
            logprobs = {"content": [self._logprob(body, i, p) for i, p in enumerate(reply.stream_pieces())]}
        n = body.get("n") or 1
        finish = self._finish(reply)
        choices = [
            {"index": j, "message": message, "logprobs": logprobs, "finish_reason": finish} for j in range(n)
        ]
        answer = {"id": "chatcmpl-up", "object": "chat.completion", "created": int(time.time()),
                  "model": model, "choices": choices}  # fmt: skip
        if not reply.usage_missing:
            answer["usage"] = self._usage(reply, n)
        return answer

    async def _events(self, model: str, reply: Reply, body: dict[str, Any]) -> AsyncIterator[bytes]:
        head = {
            "id": "chatcmpl-up",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        n = body.get("n") or 1

        def event(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
            choices = [
                {"index": j, "delta": delta, "logprobs": logprobs, "finish_reason": finish} for j in range(n)
            ]
            return b"data: " + orjson.dumps({**head, "choices": choices}) + b"\n\n"

        try:
            yield event({"role": "assistant", "content": ""})
            for i, piece in enumerate(reply.stream_pieces()):
                if reply.error_after is not None and i == reply.error_after:
                    yield (
                        b"data: "
                        + orjson.dumps({"error": {"message": reply.error_text, "type": "server_error"}})
                        + b"\n\n"
                    )
                    return
                if i and reply.delay_between:
                    await asyncio.sleep(reply.delay_between)
                logprobs = {"content": [self._logprob(body, i, piece)]} if body.get("logprobs") else None
                yield event({"content": piece}, logprobs=logprobs)
            for i, call in enumerate(self._calls(reply)):
                # Fragmented as OpenAI does: id and name first, then the arguments in two pieces.
                args = call["function"]["arguments"]
                first = {
                    "index": i,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""},
                }
                yield event({"tool_calls": [first]})
                half = len(args) // 2
                for part in (args[:half], args[half:]):
                    yield event({"tool_calls": [{"index": i, "function": {"arguments": part}}]})
            if reply.omit_done:
                return
            if not reply.finish_missing:
                yield event({}, self._finish(reply))
            if (body.get("stream_options") or {}).get("include_usage") and not reply.usage_missing:
                yield (
                    b"data: "
                    + orjson.dumps({**head, "choices": [], "usage": self._usage(reply, n)})
                    + b"\n\n"
                )
            if reply.delay_done:
                await asyncio.sleep(reply.delay_done)
            yield b"data: [DONE]\n\n"
            if reply.held_open:
                await asyncio.sleep(reply.held_open)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    async def embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        if denied := self._denied(request):
            return denied
        if not self.embeddings_served:  # llama.cpp's words, its `code` a number
            words = "This server does not support embeddings. Start it with `--embeddings`"
            error = {"code": 501, "message": words, "type": "not_supported_error"}
            return _json({"error": error}, 501)
        given = body["input"]
        # As OpenAI reads it: a string or a list of token ids is one input, a list of either is many.
        one = isinstance(given, str) or (bool(given) and isinstance(given[0], int))
        inputs = [given] if one else given
        data = [
            {"object": "embedding", "index": i, "embedding": self.vector(self.text_of(item))}
            for i, item in enumerate(inputs)
        ]
        tokens = sum(len(item) if isinstance(item, list) else len(item.split()) for item in inputs)
        return _json({"object": "list", "data": data, "model": body["model"],
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip

    async def list_models(self, request: Request) -> Response:
        self.requests.append((request.url.path, None, dict(request.headers)))
        if denied := self._denied(request):
            return denied
        data = [
            {"id": m, "object": "model", "created": 1715367049, "owned_by": "system"} for m in self.models
        ]
        return _json({"object": "list", "data": data})
