"""Ollama's answers, whole and streamed, and its errors, in the gateway's terms (contracts/ollama.md
§2.4-2.5, §6)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelMissing,
    UpstreamProtocol,
    UpstreamRejected,
    quoting,
)
from gateway.providers.base import random_id
from gateway.schemas import Choice, Chunk, Completion, FinishReason, ToolCallDelta, Usage
from gateway.upstream import json_or_none

# Ollama's 500s for what the request asked, not for a fault of its own (0.5.4 and newer alike): a
# wrongly typed `options` value (Options.FromMap, reported by handleScheduleError's default), and a
# `format` it cannot turn into a grammar (llm.Completion). A stream that has begun gets them as its
# error line. They are the client's to fix: a 400, neither retried elsewhere nor counted against
# the instance, whose next request is served as well as ever.
BAD_OPTION = re.compile(r'^option "([^"]+)" must be of ')
BAD_FORMAT = ("invalid JSON schema in format", "invalid format: ")
BAD_DURATION = ("time: ", "Unsupported type: ")  # a 400, for a keep_alive Go cannot read


def refused_request(text: str) -> InvalidRequest | None:
    """The client's error in words Ollama answers with a 500 (None: a fault of Ollama's own)."""
    if option := BAD_OPTION.match(text):
        param = f"options.{option.group(1)}"
    elif text.startswith(BAD_FORMAT):
        param = "response_format"
    else:
        return None
    return quoting(InvalidRequest(f"Ollama rejected the request: {text}", param=param), text)


def finish_reason(done_reason: str | None, tool_calls: bool) -> FinishReason:
    """Ollama says `stop` after tool calls too; `length` stays `length` with calls before it, as
    OpenAI and Gemini (MAX_TOKENS) report it: the answer was cut, its last call may be missing."""
    if done_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


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
            said = str(line["error"])
            if refused := refused_request(said):  # 0.5.4 writes them as a stream's first line
                raise refused
            raise quoting(
                UpstreamRejected(f"Ollama reported an error mid-stream: {said}", upstream_status=500), said
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
        return ModelMissing(
            f"The model '{model}' is not available on the Ollama server;"
            f" run `ollama pull {model}` there to install it."
        )
    if status == 400:
        param = next((p for p in ("tools", "format", "stop", "images", "think") if p in text), None)
        if text.startswith(BAD_DURATION):  # api.Duration's words: only keep_alive is one
            param = "keep_alive"
        params = {"format": "response_format", "images": "messages", "think": "reasoning_effort"}
        refused = InvalidRequest(f"Ollama rejected the request: {text}", param=params.get(param or "", param))
        return quoting(refused, text)
    if client_fault := refused_request(text):
        return client_fault
    given = (headers or {}).get("retry-after")
    retry = {"retry-after": given or "1"} if status in (429, 503) else None
    # 503 'server busy, please try again. maximum pending requests exceeded': its queue is full
    busy = status == 503 and "server busy" in text
    return quoting(
        UpstreamRejected(
            f"Ollama answered {status}" + (f": {text}" if text else ""),
            upstream_status=status,
            headers=retry,
            busy=busy,
        ),
        text,
    )
