"""OpenAI's legacy text completions (POST /v1/completions), served as chat.

Each prompt becomes a chat request with one user message, so the backend applies the model's chat
template to it, as Ollama's own OpenAI-compatible /v1/completions does. The answers come back in
the legacy shape: `text_completion` objects whose choices hold `text`, numbered
prompt_index * n + j, with log probabilities as `{tokens, token_logprobs, top_logprobs,
text_offset}`. Several prompts are several chat requests, sent at once: their answers are joined
into one, their streams into one stream (`fan_in`), as OpenAI interleaves the choices of a stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from gateway.body import validate
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.exchange import Exchange
from gateway.policy import Plan
from gateway.providers.base import random_id
from gateway.relay import StreamSource
from gateway.schemas import (
    DEFAULT_COMPLETION_TOKENS,
    ChatRequest,
    Chunk,
    Completion,
    CompletionRequest,
    FinishReason,
    Usage,
)

T = TypeVar("T")

# Chat's own fields that a completions request does not have: sent here, they would change what
# the chat request asks for (tools, a conversation, reasoning) in ways the legacy answer cannot carry.
CHAT_ONLY = sorted(set(ChatRequest.model_fields) - set(CompletionRequest.model_fields))
# The completions fields the translation replaces with chat's (the rest pass on as they came).
TRANSLATED = ("prompt", "echo", "best_of", "suffix", "logprobs", "max_tokens")
# A chat answer's finish reasons in the legacy shape, which has no `tool_calls` (no tools are sent).
FINISH: dict[FinishReason, str] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "stop",
}


# ---- the request ----


def check(request: CompletionRequest, data: dict[str, Any]) -> None:
    """The 400s for what the translation cannot serve, each naming its field."""
    for field in CHAT_ONLY:
        if data.get(field) is not None:
            raise InvalidRequest(
                f"'{field}' is a chat completions parameter, not one of /v1/completions: send the"
                " request to /v1/chat/completions to use it.",
                param=field,
            )
    if request.suffix is not None:
        raise InvalidRequest(
            "'suffix' is not served: no backend here inserts text between a prompt and a suffix.",
            param="suffix",
        )
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise InvalidRequest(
            "'best_of' must equal 'n' or be left out: the gateway returns every completion it asks"
            " for and ranks none.",
            param="best_of",
        )
    if request.echo and request.logprobs is not None:
        raise InvalidRequest(
            "'echo' with 'logprobs' asks for the prompt's log probabilities, which chat backends do not"
            " report: leave out one of them.",
            param="echo",
        )


def chat_requests(request: CompletionRequest, data: dict[str, Any]) -> list[ChatRequest]:
    """One chat request per prompt: the fields both APIs have, and any field neither defines (an
    OpenAI-compatible backend gets those as on chat), as the client sent them."""
    common = {key: value for key, value in data.items() if key not in TRANSLATED}
    common["max_tokens"] = request.max_tokens or DEFAULT_COMPLETION_TOKENS
    if request.logprobs is not None:
        common["logprobs"] = True
        common["top_logprobs"] = request.logprobs
    return [
        validate(ChatRequest, {**common, "messages": [{"role": "user", "content": prompt}]})
        for prompt in request.prompts
    ]


def about_prompt(error: GatewayError) -> GatewayError:
    """An error about the chat request's messages (a prompt past the model's context, one a backend
    refuses) is about the prompt the client sent."""
    param = error.param
    if param is not None and (param == "messages" or param.startswith(("messages[", "messages."))):
        error.param = "prompt"
    return error


# ---- the answer ----


def legacy_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> tuple[dict[str, Any], int]:
    """Chat's `logprobs.content` entries as the legacy object, and the text offset after them.
    `top_logprobs` maps each token's alternatives to their log probabilities, the chosen token
    among them, as OpenAI's does; `text_offset` counts characters of the completion's text."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float | None]] = []
    offsets: list[int] = []
    for entry in entries:
        token = str(entry.get("token") or "")
        logprob = entry.get("logprob")
        alternatives = {
            str(alternative.get("token") or ""): alternative.get("logprob")
            for alternative in entry.get("top_logprobs") or ()
            if isinstance(alternative, dict)
        }
        alternatives.setdefault(token, logprob)
        tokens.append(token)
        token_logprobs.append(logprob)
        top.append(alternatives)
        offsets.append(offset)
        offset += len(token)
    legacy = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
    return legacy, offset


def summed(usages: Iterable[Usage]) -> Usage:
    total = Usage()
    for usage in usages:
        total.prompt_tokens += usage.prompt_tokens
        total.completion_tokens += usage.completion_tokens
        if usage.cached_tokens is not None:
            total.cached_tokens = (total.cached_tokens or 0) + usage.cached_tokens
        if usage.reasoning_tokens is not None:
            total.reasoning_tokens = (total.reasoning_tokens or 0) + usage.reasoning_tokens
    return total


def joined(completions: list[Completion], n: int) -> Completion:
    """The answers to every prompt as one: their choices numbered prompt_index * n + j, their
    usage summed (counted only when every backend counted), their notices together."""
    if len(completions) == 1:
        return completions[0]
    choices = []
    for position, completion in enumerate(completions):
        for choice in completion.choices:
            choice.index += position * n
            choices.append(choice)
    notices = {key: value for completion in completions for key, value in completion.notices.items()}
    return Completion(
        choices,
        usage=summed(completion.usage for completion in completions),
        counted=all(completion.counted for completion in completions),
        notices=notices,
        extra=completions[0].extra,
    )


def text_completion_body(completion: Completion, request: CompletionRequest, *, model: str) -> dict[str, Any]:
    prompts, n = request.prompts, request.n or 1
    choices = []
    for choice in sorted(completion.choices, key=lambda choice: choice.index):
        text = choice.content or ""
        logprobs = None if choice.logprobs is None else legacy_logprobs(choice.logprobs)[0]
        choices.append(
            {
                "text": prompts[choice.index // n] + text if request.echo else text,
                "index": choice.index,
                "logprobs": logprobs,
                "finish_reason": FINISH[choice.finish_reason],
            }
        )
    body: dict[str, Any] = {
        "id": random_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": completion.usage.as_dict(),
    }
    if isinstance(fingerprint := completion.extra.get("system_fingerprint"), str):
        body["system_fingerprint"] = fingerprint
    return body


class TextEncoder:
    """Encodes a completions stream's chunks as `text_completion` events (for StreamRelay): each
    chunk's text for its choice, with `echo` the prompt before a choice's first text, and log
    probabilities in the legacy shape, their offsets counted on from one event to the next. The
    events have no `usage` member but the last, with `stream_options.include_usage` (the legacy
    schema's usage is an object, never null)."""

    __slots__ = ("_echoes", "_finished", "_head", "_n", "_offsets", "_prefix", "_started")

    def __init__(self, request: CompletionRequest, model: str) -> None:
        self._head: dict[str, Any] = {
            "id": random_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model
        }  # fmt: skip
        self._echoes = request.prompts if request.echo else None
        self._n = request.n or 1
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._offsets: dict[int, int] = {}
        self.extend({})

    def extend(self, fields: dict[str, str]) -> None:
        """An OpenAI backend's `system_fingerprint` goes on every event from now on, as on chat."""
        if "system_fingerprint" in fields:
            self._head["system_fingerprint"] = fields["system_fingerprint"]
        self._prefix = b"data: " + orjson.dumps(self._head)[:-1] + b',"choices":['

    def encode(self, chunk: Chunk) -> bytes:
        index = chunk.index
        text = chunk.content
        if self._echoes is not None and index not in self._started:
            self._started.add(index)
            text = self._echoes[index // self._n] + text
        finish = None
        if chunk.finish_reason is not None and index not in self._finished:
            self._finished.add(index)
            finish = FINISH[chunk.finish_reason]
        logprobs = None
        if chunk.logprobs is not None:
            logprobs, self._offsets[index] = legacy_logprobs(chunk.logprobs, self._offsets.get(index, 0))
        if not text and finish is None and logprobs is None:
            return b""  # a role, reasoning or usage alone: nothing the legacy shape has
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        return self._prefix + orjson.dumps(choice) + b"]}\n\n"

    def usage(self, usage: Usage) -> bytes:
        return self._prefix + b'],"usage":' + orjson.dumps(usage.as_dict()) + b"}\n\n"


# ---- several prompts at once ----


async def together(tasks: Sequence[asyncio.Future[T]]) -> list[T]:
    """Every task's result, in order. The first failure cancels the others (their answers could
    no longer be used) and is raised once they have ended."""
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        _retrieved(tasks)
        raise


def _retrieved(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Marks the failures of ended futures as seen: one is raised, the others only went with it
    (asyncio would log them as never retrieved)."""
    for future in futures:
        if not future.cancelled():
            future.exception()


async def _close(source: StreamSource) -> None:
    """An opened stream that will not be relayed: closed, its lease released."""
    try:
        await source.rest.aclose()  # type: ignore[attr-defined]
    finally:
        source.on_close(None)


async def opened(tasks: Sequence[asyncio.Future[StreamSource]]) -> list[StreamSource]:
    """Every prompt's stream, opened at once; when one cannot be, those that were are closed."""
    try:
        return await together(tasks)
    except BaseException:
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is None:
                await _close(task.result())
        raise


@dataclass(slots=True)
class _FanIn:
    sources: list[StreamSource]
    n: int
    failed: int | None = None  # the stream whose failure ended the whole

    def numbered(self, position: int, chunks: list[Chunk], usages: list[Usage | None]) -> list[Chunk]:
        for chunk in chunks:
            chunk.index += position * self.n
            if chunk.usage is not None:
                usages[position], chunk.usage = chunk.usage, None
        return chunks

    async def rest(self, usages: list[Usage | None]) -> AsyncIterator[list[Chunk]]:
        streams = [source.rest for source in self.sources]
        pending: dict[asyncio.Future[list[Chunk]], int] = {}
        try:
            for position, stream in enumerate(streams):
                pending[asyncio.ensure_future(_next(stream))] = position
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                out: list[Chunk] = []
                for future in sorted(done, key=pending.__getitem__):
                    position = pending.pop(future)
                    try:
                        chunks = future.result()
                    except StopAsyncIteration:
                        continue
                    except BaseException:
                        self.failed = position
                        raise
                    out += self.numbered(position, chunks, usages)
                    pending[asyncio.ensure_future(_next(streams[position]))] = position
                if out:
                    yield out
            if all(usage is not None for usage in usages):
                yield [Chunk(usage=summed(usage for usage in usages if usage is not None))]
        finally:
            for future in pending:
                future.cancel()
            if pending:  # a stream is closed only once nothing is reading it
                await asyncio.wait(pending)
                _retrieved(pending)
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]

    def closed(self, failure: UpstreamError | None) -> None:
        for position, source in enumerate(self.sources):
            source.on_close(failure if position == self.failed else None)


async def _next(stream: AsyncIterator[list[Chunk]]) -> list[Chunk]:
    return await anext(stream)


def fan_in(sources: list[StreamSource], n: int) -> StreamSource:
    """Every prompt's stream as one: chunks as they come, numbered prompt_index * n + j, and the
    usage summed into one last chunk once all have ended (none when one of them counted none).
    The idle and total deadlines are the shortest of theirs."""
    fan = _FanIn(sources, n)
    usages: list[Usage | None] = [None] * len(sources)
    first = [
        chunk
        for position, source in enumerate(sources)
        for chunk in fan.numbered(position, source.first, usages)
    ]
    return StreamSource(
        first=first,
        rest=fan.rest(usages),
        idle_timeout=min(source.idle_timeout for source in sources),
        deadline=min(source.deadline for source in sources),
        on_close=fan.closed,
    )


async def complete_all(
    dispatcher: Dispatcher, plans: list[Plan], chats: list[ChatRequest], exchange: Exchange
) -> list[Completion]:
    """Every prompt's answer. One prompt is sent as a chat request is; several at once."""
    if len(chats) == 1:
        return [await dispatcher.complete(plans, chats[0], exchange)]
    return await _at_once(
        chats, exchange, lambda chat, branch: dispatcher.complete(plans, chat, branch), together
    )


async def open_all(
    dispatcher: Dispatcher, plans: list[Plan], chats: list[ChatRequest], exchange: Exchange, n: int
) -> StreamSource:
    """Every prompt's stream, opened (as `complete_all` sends them), as one."""
    if len(chats) == 1:
        return await dispatcher.open_stream(plans, chats[0], exchange)
    sources = await _at_once(
        chats, exchange, lambda chat, branch: dispatcher.open_stream(plans, chat, branch), opened
    )
    return fan_in(sources, n)


async def _at_once(
    chats: list[ChatRequest],
    exchange: Exchange,
    send: Callable[[ChatRequest, Exchange], Awaitable[T]],
    gathered: Callable[[Sequence[asyncio.Future[T]]], Awaitable[list[T]]],
) -> list[T]:
    """`send` for every prompt's chat request at once, each with a branch of the request's record,
    joined into it at the end (`Exchange.absorb`); `gathered` awaits them."""
    branches = [exchange.branch() for _ in chats]
    try:
        return await gathered(
            [asyncio.ensure_future(send(chat, branch)) for chat, branch in zip(chats, branches, strict=True)]
        )
    finally:
        exchange.absorb(branches)
