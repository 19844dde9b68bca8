"""Gemini's answers, whole and streamed, and its errors, in the gateway's terms (contracts/gemini.md
§8, §10)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    UpstreamProtocol,
    UpstreamRejected,
    quoting,
)
from gateway.providers.base import random_id
from gateway.providers.gemini.request import GEMINI_ID, SIGNATURE
from gateway.schemas import Choice, Chunk, Completion, FinishReason, ToolCallDelta, Usage
from gateway.upstream import json_or_none

FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
            "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION"}  # fmt: skip


# Gemini's 400 for a prompt past the model's context: "The input token count (1200293) exceeds the
# maximum number of tokens allowed (1048576)." OpenAI says that with its code context_length_exceeded,
# which clients look for (LangChain raises its ContextOverflowError on it), as llama.cpp's server does.
TOO_LONG = re.compile(r"input token count.*exceeds the maximum number of tokens", re.IGNORECASE | re.DOTALL)


def finish_reason(native: str | None, tool_calls: bool) -> FinishReason:
    if native in FILTERED:
        return "content_filter"
    if native == "MAX_TOKENS":
        return "length"
    return "tool_calls" if tool_calls else "stop"  # STOP, OTHER, MALFORMED_..., unknown values


def usage(metadata: Any) -> Usage:
    """OpenAI counts reasoning in completion_tokens, and reports that part apart (contracts §10.4)."""
    meta = metadata if isinstance(metadata, dict) else {}
    thoughts = meta.get("thoughtsTokenCount")
    cached = meta.get("cachedContentTokenCount")
    return Usage(
        int(meta.get("promptTokenCount") or 0),
        int(meta.get("candidatesTokenCount") or 0) + int(thoughts or 0),
        cached_tokens=int(cached) if cached is not None else None,
        reasoning_tokens=int(thoughts) if thoughts is not None else None,
    )


def _tool_call(part: dict[str, Any], index: int) -> ToolCallDelta:
    call = part["functionCall"] if isinstance(part["functionCall"], dict) else {}
    call_id = random_id("call_")
    if part.get("thoughtSignature"):
        call_id += SIGNATURE + str(part["thoughtSignature"])
    if call.get("id"):
        call_id += GEMINI_ID + str(call["id"])
    arguments = orjson.dumps(call.get("args") or {}).decode()
    return ToolCallDelta(index=index, id=call_id, name=str(call.get("name") or ""), arguments=arguments)


class _Candidate(NamedTuple):
    choice: int  # its index
    parts: list[dict[str, Any]]
    finish: str | None
    logprobs: list[dict[str, Any]] | None


def _candidates(body: dict[str, Any]) -> list[_Candidate]:
    """The answer's candidates; proto3 leaves out zeros and empty lists."""
    out = []
    for position, candidate in enumerate(c for c in body.get("candidates") or () if isinstance(c, dict)):
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        parts = [part for part in parts or () if isinstance(part, dict)]
        index = int(candidate.get("index", position))
        out.append(_Candidate(index, parts, candidate.get("finishReason"), _logprobs(candidate)))
    return out


def _logprobs(candidate: dict[str, Any]) -> list[dict[str, Any]] | None:
    """`logprobsResult` (asked for with responseLogprobs) as OpenAI's `logprobs.content` entries."""
    result = candidate.get("logprobsResult")
    if not isinstance(result, dict):
        return None
    tops: list[list[Any]] = []
    for step in result.get("topCandidates") or ():
        alternatives = step.get("candidates") if isinstance(step, dict) else None
        tops.append(alternatives if isinstance(alternatives, list) else [])
    entries = []
    for k, chosen in enumerate(result.get("chosenCandidates") or ()):
        if isinstance(chosen, dict):
            top = [_token(c) for c in (tops[k] if k < len(tops) else ()) if isinstance(c, dict)]
            entries.append({**_token(chosen), "top_logprobs": top})
    return entries


def _token(candidate: dict[str, Any]) -> dict[str, Any]:
    token = str(candidate.get("token") or "")
    return {
        "token": token,
        "logprob": float(candidate.get("logProbability") or 0.0),
        "bytes": list(token.encode()),
    }


def _blocked(body: dict[str, Any]) -> str | None:
    """The refusal for a blocked prompt (`promptFeedback.blockReason`), or None."""
    feedback = body.get("promptFeedback")
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    return f"blocked: {reason}" if reason else None


def parse_response(body: Any) -> Completion:
    if not isinstance(body, dict):
        raise UpstreamProtocol("Gemini answered with something other than a JSON object")
    candidates = _candidates(body)
    if not candidates and (refusal := _blocked(body)):
        metadata = body.get("usageMetadata")
        return Completion(
            [Choice(content=None, refusal=refusal, finish_reason="content_filter")],
            usage(metadata),
            counted=isinstance(metadata, dict),
        )
    if not candidates:
        raise UpstreamProtocol("Gemini answered without candidates")
    choices = []
    for index, parts, reason, logprobs in candidates:
        text: list[str] = []
        thoughts: list[str] = []
        calls: list[ToolCallDelta] = []
        for part in parts:
            if "functionCall" in part:
                calls.append(_tool_call(part, len(calls)))
            elif isinstance(part.get("text"), str):
                (thoughts if part.get("thought") else text).append(part["text"])
        choices.append(
            Choice(
                index=index,
                content="".join(text) or (None if calls else ""),
                reasoning="".join(thoughts) or None,
                tool_calls=calls,
                finish_reason=finish_reason(reason, bool(calls)),
                logprobs=logprobs,
            )
        )
    metadata = body.get("usageMetadata")
    return Completion(
        sorted(choices, key=lambda c: c.index), usage(metadata), counted=isinstance(metadata, dict)
    )


class StreamState:
    """Turns SSE payloads into chunks; remembers what a stream has seen so far, per choice."""

    __slots__ = ("done", "finished", "tool_calls", "usage", "usage_sent")

    def __init__(self) -> None:
        self.tool_calls: dict[int, int] = {}  # choice index -> calls emitted so far
        self.finished: set[int] = set()
        self.usage: Usage | None = None
        self.usage_sent = False
        self.done = False

    def parse_chunk(self, data: Any) -> list[Chunk]:
        if not isinstance(data, dict):
            raise UpstreamProtocol("Gemini sent a stream event that is not a JSON object")
        if "error" in data:
            code = data["error"].get("code") if isinstance(data["error"], dict) else None
            raise error_from(int(code or 500), orjson.dumps(data), "")
        if "usageMetadata" in data:
            self.usage, self.usage_sent = usage(data["usageMetadata"]), False
        candidates = _candidates(data)
        if not candidates and (refusal := _blocked(data)):
            self.done = True
            self.finished.add(0)
            return [Chunk(refusal=refusal), self._finish(Chunk(finish_reason="content_filter"))]
        chunks: list[Chunk] = []
        for index, parts, reason, logprobs_of_event in candidates:
            calls = self.tool_calls.setdefault(index, 0)
            logprobs = logprobs_of_event
            for part in parts:
                if "functionCall" in part:
                    chunks.append(Chunk(tool_calls=[_tool_call(part, calls)], index=index))
                    calls += 1
                elif part.get("text") and part.get("thought"):
                    chunks.append(Chunk(reasoning=str(part["text"]), index=index))
                elif part.get("text"):  # the event's log probabilities go with its first text
                    chunks.append(Chunk(content=str(part["text"]), index=index, logprobs=logprobs))
                    logprobs = None
            self.tool_calls[index] = calls
            if reason and index not in self.finished:
                self.done = True
                self.finished.add(index)
                chunks.append(
                    self._finish(Chunk(finish_reason=finish_reason(reason, calls > 0), index=index))
                )
        return chunks

    def _finish(self, chunk: Chunk) -> Chunk:
        chunk.usage, self.usage_sent = self.usage, self.usage is not None
        return chunk

    def close(self) -> list[Chunk]:
        """End of body: finish the choices still open (a missing finishReason is STOP); hand over
        usage that came after the finish. A body without any candidate is no answer at all."""
        if not self.done and not self.tool_calls:
            raise UpstreamProtocol("Gemini ended the stream without any candidate")
        chunks = [
            self._finish(Chunk(finish_reason=finish_reason(None, calls > 0), index=index))
            for index, calls in sorted(self.tool_calls.items())
            if index not in self.finished
        ]
        if self.usage is not None and not self.usage_sent:
            chunks.append(self._finish(Chunk(usage=self.usage)))
        return chunks


def parse_chunk(data: Any, state: StreamState) -> list[Chunk]:
    return state.parse_chunk(data)


def error_from(
    status: int, content: bytes, model: str, headers: Mapping[str, str] | None = None
) -> GatewayError:
    body = json_or_none(content)
    if isinstance(body, list) and len(body) == 1:  # errors may come wrapped in a one-element array
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {"message": content[:200].decode("utf-8", "replace")}
    text = str(error.get("message") or "")[:300]
    kind = str(error.get("status") or "")
    details = [d for d in error.get("details") or () if isinstance(d, dict)]
    if kind == "NOT_FOUND" or (status == 404 and not kind):
        return ModelNotFound(f"The model '{model.removeprefix('models/')}' is not available on Gemini")
    if any(d.get("reason") == "API_KEY_INVALID" for d in details):  # a 400 the client cannot fix
        return UpstreamRejected(
            "Gemini refused the gateway's API key; check its api_key_env", upstream_status=401
        )
    if kind in ("INVALID_ARGUMENT", "FAILED_PRECONDITION") or (status == 400 and not kind):
        if TOO_LONG.search(text):
            too_long = InvalidRequest(
                f"Gemini rejected the request: {text}", param="messages", code="context_length_exceeded"
            )
            return quoting(too_long, text)
        return quoting(InvalidRequest(f"Gemini rejected the request: {text}"), text)
    if kind in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        upstream = 401 if kind == "UNAUTHENTICATED" else 403
        refused = UpstreamRejected(
            f"Gemini refused the gateway's credentials: {text}", upstream_status=upstream
        )
        return quoting(refused, text)
    codes = {"RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "INTERNAL": 500, "DEADLINE_EXCEEDED": 504}
    upstream = codes.get(kind, status)
    retry = (headers or {}).get("retry-after") or _retry_delay(details)
    rejected = UpstreamRejected(
        f"Gemini answered {upstream}" + (f": {text}" if text else ""),
        upstream_status=upstream,
        headers={"retry-after": retry} if retry and upstream in (429, 503) else None,
        # 503 'The model is overloaded. Please try again later.': Gemini is up, only full for now
        busy=upstream == 503 and "overloaded" in text.lower(),
    )
    return quoting(rejected, text)


def _retry_delay(details: list[dict[str, Any]]) -> str | None:
    """Seconds from a RetryInfo detail (`"retryDelay": "37.5s"`), rounded up."""
    delays = [str(d["retryDelay"]).removesuffix("s") for d in details if "retryDelay" in d]
    try:
        return str(math.ceil(float(delays[0]))) if delays else None
    except ValueError:
        return None
