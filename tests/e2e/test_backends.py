"""One table of scenarios through the official SDK against every backend type: a client must not be
able to tell which backend answered, apart from the model it asked for."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import unquote

import httpx
import openai
import pytest
from openai.types.chat import (
    ChatCompletionContentPartImageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionStreamOptionsParam,
)
from openai.types.shared import ReasoningEffort
from pydantic import BaseModel

from gateway.config import parse_config
from tests.e2e.conftest import KEY, Rig, rig_config, rig_fake, sample, scrape, wait_for
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, serve

pytestmark = pytest.mark.e2e
TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}


def test_plain_completion(rig: Rig) -> None:
    rig.fake.queue(Reply(content="Hello world", prompt_eval_count=7, eval_count=2))
    reply = rig.api.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=9
    )
    assert reply.choices[0].message.content == "Hello world"
    assert (reply.model, reply.object, reply.choices[0].finish_reason) == ("chat", "chat.completion", "stop")
    assert reply.id.startswith("chatcmpl-") and reply.id != "chatcmpl-up"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (7, 2, 9)
    samples = scrape(rig.gateway.url)
    assert (
        sample(samples, "gateway_requests_total", endpoint="chat", model="chat", backend="b", status="200")
        == 1
    )
    assert sample(samples, "gateway_tokens_total", model="chat", backend="b", type="prompt") == 7
    assert sample(samples, "gateway_tokens_total", model="chat", backend="b", type="completion") == 2


@pytest.mark.parametrize("include_usage", [True, False])
def test_streaming(rig: Rig, include_usage: bool) -> None:
    rig.fake.queue(Reply(pieces=["Hel", "lo ", "there"], prompt_eval_count=4, eval_count=3))
    options: ChatCompletionStreamOptionsParam | None = {"include_usage": True} if include_usage else None
    chunks = list(
        rig.api.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options=options
        )
    )
    assert len({(c.id, c.created) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    usage_chunks = [c for c in chunks if not c.choices]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
        assert usage_chunks[0].usage is not None and usage_chunks[0].usage.total_tokens == 7
    else:
        assert usage_chunks == []
        assert all(c.usage is None for c in chunks)


def test_tool_call_then_answer(rig: Rig) -> None:
    rig.fake.queue(
        Reply(content="", tool_calls=[{"function": {"name": "lookup", "arguments": {"q": "oslo"}}}]),
        Reply(content="Found it."),
    )
    messages: list[Any] = [{"role": "user", "content": "find oslo"}]
    first = rig.api.chat.completions.create(model="chat", messages=messages, tools=[TOOL])
    call = (first.choices[0].message.tool_calls or [])[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("lookup", {"q": "oslo"})
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "59.9N"},
    ]
    second = rig.api.chat.completions.create(model="chat", messages=messages, tools=[TOOL])
    assert second.choices[0].message.content == "Found it."
    sent = rig.upstream_bodies()[-1]
    assert len(sent.get("messages") or sent["contents"]) == 3  # user, assistant call, tool result


def test_streamed_tool_calls_merge_into_one_call(rig: Rig) -> None:
    rig.fake.queue(
        Reply(content="", tool_calls=[{"function": {"name": "lookup", "arguments": {"q": "lima"}}}])
    )
    with rig.api.chat.completions.stream(
        model="chat", messages=[{"role": "user", "content": "x"}], tools=[TOOL]
    ) as s:
        final = s.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("lookup", {"q": "lima"})]
    assert calls[0].id.startswith("call_") and calls[0].id.count("call_") == 1


def test_an_empty_answer_streamed_finishes_its_choice(rig: Rig) -> None:
    # An OpenAI-compatible server may end an empty answer with its role delta and [DONE] alone,
    # no finish_reason: the choice still finishes, as from Ollama and Gemini. Unfinished, the SDK's
    # final completion held finish_reason None, and the Node SDK's threw "missing finish_reason".
    rig.fake.queue(Reply(content="", finish_missing=True))
    with rig.api.chat.completions.stream(model="chat", messages=[{"role": "user", "content": "x"}]) as events:
        final = events.get_final_completion()
    assert [(c.index, c.finish_reason, c.message.content) for c in final.choices] == [(0, "stop", "")]


class Lookup(BaseModel):
    q: str


@pytest.mark.parametrize("stream", [False, True], ids=["parse", "stream"])
def test_a_tool_call_answer_cut_by_max_tokens_is_length_for_the_sdks_parse(rig: Rig, stream: bool) -> None:
    # Ollama says done_reason `length` with the calls it parsed before the cut; OpenAI and Gemini
    # (MAX_TOKENS) say `length` too, so the SDK raises LengthFinishReasonError on every backend
    # rather than hand over calls that may not be all the model meant to make.
    cut = [{"function": {"name": "Lookup", "arguments": {"q": "oslo"}}}]
    rig.fake.queue(Reply(content="", tool_calls=cut, done_reason="length"))
    messages: list[Any] = [{"role": "user", "content": "x"}]
    tools = [openai.pydantic_function_tool(Lookup)]
    with pytest.raises(openai.LengthFinishReasonError) as caught:
        if stream:
            with rig.api.chat.completions.stream(
                model="chat", messages=messages, tools=tools, max_tokens=8
            ) as events:
                events.get_final_completion()
        else:
            rig.api.chat.completions.parse(model="chat", messages=messages, tools=tools, max_tokens=8)
    assert caught.value.completion.choices[0].finish_reason == "length"


def _streamed(
    kind: str,
    fake: FakeOllama | FakeOpenAI | FakeGemini,
    start_gateway: Callable[..., ServerThread],
    **backend: Any,
) -> tuple[list[Any], str]:
    """One answer from `fake`, streamed through a gateway with usage asked for: its chunks, as the
    official SDK reads them, and the gateway's URL (still serving, for its metrics)."""
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config(kind, upstream.url, **backend), environ={"FAKE_KEY": KEY})
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="client", max_retries=0, timeout=10) as api:
            chunks = list(
                api.chat.completions.create(
                    model="chat",
                    messages=[{"role": "user", "content": "x"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
    return chunks, gateway.url


def _assert_ended_with_stop(chunks: list[Any], text: str) -> None:
    """The stream shape every backend gives: the text, one `stop`, then the usage chunk."""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


class Unfinished(TypedDict, total=False):
    """The ways a fake's stream can end without a finish_reason (`Reply`'s fields)."""

    omit_done: bool
    finish_missing: bool


@pytest.mark.parametrize(
    ("kind", "unfinished"),
    [
        # SSE has no end marker: a body that ends cleanly is the end of the answer (contracts/gemini.md
        # 10.2), so the text already sent is not lost to an error event.
        ("gemini", {"omit_done": True}),
        # [DONE] without a finish_reason: the same stream shape as from Ollama and Gemini.
        ("openai", {"finish_missing": True}),
    ],
)
def test_a_stream_that_ends_cleanly_without_finish_reason_ends_with_stop(
    start_gateway: Callable[..., ServerThread], kind: str, unfinished: Unfinished
) -> None:
    fake = rig_fake(kind)
    fake.queue(Reply(pieces=["All of ", "the answer."], prompt_eval_count=4, **unfinished))
    chunks, _ = _streamed(kind, fake, start_gateway)
    _assert_ended_with_stop(chunks, "All of the answer.")
    assert chunks[-1].usage.prompt_tokens == 4


@pytest.mark.parametrize(
    ("kind", "marker_alone"),
    [("ollama", False), ("openai", False), ("openai", True)],
    ids=["ollama", "openai", "openai-done-alone"],
)
def test_a_stream_is_whole_at_its_end_marker_though_the_backend_holds_its_body_open(
    start_gateway: Callable[..., ServerThread], kind: str, marker_alone: bool
) -> None:
    # A proxy that holds back the last chunk: `done` (Ollama) or `[DONE]` (OpenAI) has come, the
    # HTTP body has not ended. The client's stream ends there, not at the idle deadline with an
    # error; also when [DONE] comes in a read of its own, bringing no chunk with it.
    fake = rig_fake(kind)
    fake.queue(
        Reply(
            pieces=["Hel", "lo"],
            prompt_eval_count=4,
            eval_count=2,
            held_open=5.0,
            delay_done=0.2 if marker_alone else 0.0,
        )
    )
    chunks, url = _streamed(kind, fake, start_gateway, timeouts={"idle": 1.0, "total": 30.0})
    _assert_ended_with_stop(chunks, "Hello")
    assert chunks[-1].usage.total_tokens == 6
    samples = scrape(url)
    labels = {"endpoint": "chat", "model": "chat", "backend": "b"}
    assert sample(samples, "gateway_requests_total", **labels, status="200") == 1
    assert sample(samples, "gateway_upstream_errors_total", backend="b", reason="timeout") == 0


def test_a_gemini_stream_whose_body_ends_inside_an_event_is_an_error_not_a_stop(
    start_gateway: Callable[..., ServerThread],
) -> None:
    # The framing is whole (the last chunk, then the chunked body's end), the last event is not:
    # its text is lost, and the client is told so rather than given a clean `stop`.
    fake = FakeGemini(api_key=KEY)
    fake.queue(Reply(pieces=["hi ", "world"], cut_last=True))
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config("gemini", upstream.url), environ={"FAKE_KEY": KEY})
        body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": True}
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=10) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        samples = scrape(gateway.url)
    assert "[DONE]" not in events
    *chunks, last = [json.loads(event) for event in events]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "hi "
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert last["error"]["code"] == "upstream_incomplete"
    labels = {"endpoint": "chat", "model": "chat", "backend": "b"}
    assert sample(samples, "gateway_requests_total", **labels, status="502") == 1


def test_json_schema(rig: Rig) -> None:
    rig.fake.queue(Reply(content='{"city": "Oslo"}'))
    schema: dict[str, object] = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    reply = rig.api.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "json"}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"city": "Oslo"}
    sent = rig.upstream_bodies()[-1]
    if rig.kind == "ollama":
        assert sent["format"] == schema
    elif rig.kind == "openai":
        assert sent["response_format"]["json_schema"]["schema"] == schema
    else:
        assert sent["generationConfig"]["responseMimeType"] == "application/json"


def test_a_gemini_json_schema_keeps_its_meaning_or_is_refused_saying_why(
    start_gateway: Callable[..., ServerThread],
) -> None:
    # pydantic v1 and zod-to-json-schema write draft-07 `definitions`; pydantic < 2.9 wraps a
    # described nested model in `allOf`. Gemini documents neither.
    addr = {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{4}$"}}}
    schema = {
        "type": "object",
        "properties": {"home": {"allOf": [{"$ref": "#/definitions/Addr"}], "description": "where"}},
        "definitions": {"Addr": addr},
    }
    recursive = {"$ref": "#/$defs/A", "$defs": {"A": {"allOf": [{"$ref": "#/$defs/A"}, {"type": "object"}]}}}
    fake = FakeGemini(api_key=KEY)
    fake.queue(Reply(content="{}"), Reply(pieces=["{", "}"]))
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config("gemini", upstream.url), environ={"FAKE_KEY": KEY})
        url = gateway.url + "/v1/chat/completions"

        def body(schema: dict[str, Any], **fields: Any) -> dict[str, Any]:
            response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
            messages = [{"role": "user", "content": "x"}]
            return {"model": "chat", "messages": messages, "response_format": response_format, **fields}

        whole = httpx.post(url, json=body(schema), timeout=10)
        with httpx.stream("POST", url, json=body(schema, stream=True), timeout=10) as response:
            comments = [line for line in response.iter_lines() if line.startswith(":")]
        refused = httpx.post(url, json=body(recursive), timeout=10)
    assert whole.status_code == 200
    assert whole.headers["x-phoenix-schema-dropped"] == "pattern"
    assert ": schema_dropped=pattern" in comments
    assert fake.chat_bodies()[0]["generationConfig"]["responseJsonSchema"] == {
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/Addr"}},
        "$defs": {"Addr": {"type": "object", "properties": {"zip": {"type": "string"}}}},
    }
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "response_format.json_schema.schema"
    assert "recursive" in error["message"]
    assert len(fake.chat_bodies()) == 2


def test_schema_keywords_the_client_wrote_with_line_breaks_or_any_character_are_named_escaped(
    start_gateway: Callable[..., ServerThread],
) -> None:
    """The keywords Gemini lacks are named in a header (an SSE comment when streaming) as the
    client wrote them: a line break ended the header (the connection dropped) or the comment (the
    rest an event of the client's making), and a character past latin-1 was a 500."""
    keywords = ["x-\u20ac", "a\r\nx-injected: 1", 'a\n\ndata: {"injected": true}']
    fake = FakeGemini(api_key=KEY)
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config("gemini", upstream.url), environ={"FAKE_KEY": KEY})
        url = gateway.url + "/v1/chat/completions"
        for keyword in keywords:
            schema = {"type": "object", "properties": {"a": {"type": "string", keyword: "x"}}}
            response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
            body = {
                "model": "chat",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": response_format,
            }
            whole = httpx.post(url, json=body, timeout=10)
            assert whole.status_code == 200, whole.text
            assert "x-injected" not in whole.headers
            named = whole.headers["x-phoenix-schema-dropped"]
            assert unquote(named) == keyword and named.isascii() and named.isprintable()
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=10) as response:
                lines = [line for line in response.iter_lines() if line]
            assert lines[-2:] == [f": schema_dropped={named}", "data: [DONE]"]
            assert not any("injected" in line for line in lines[:-2])


@pytest.mark.parametrize("kind", ["ollama", "gemini"])
def test_a_tool_choice_asking_for_a_call_without_tools_is_refused_before_the_backend(
    start_gateway: Callable[..., ServerThread], kind: str
) -> None:
    fake = rig_fake(kind)
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config(kind, upstream.url), environ={"FAKE_KEY": KEY})
        choice = {"type": "function", "function": {"name": "lookup"}}
        body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "tool_choice": choice}
        refused = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "tool_choice"
    assert fake.chat_bodies() == []


@pytest.mark.parametrize("effort", [["high"], {"effort": "high"}, 5], ids=["list", "object", "number"])
def test_a_reasoning_effort_that_is_not_a_name_is_refused_naming_it(rig: Rig, effort: object) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": effort}
    refused = httpx.post(rig.gateway.url + "/v1/chat/completions", json=body, timeout=10)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "reasoning_effort"
    assert rig.upstream_bodies() == []


def test_image_input(rig: Rig) -> None:
    rig.fake.queue(Reply(content="A cat."))
    part: ChatCompletionContentPartImageParam = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    reply = rig.api.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, part]}],
    )
    assert reply.choices[0].message.content == "A cat."


def test_embeddings(rig: Rig) -> None:
    # The SDK asks for base64 by default, which carries float32: equal to float32 precision.
    raw = rig.api.embeddings.with_raw_response.create(model="embed", input=["one", "two words"])
    result = raw.parse()
    expected = [rig.fake.vector("one"), rig.fake.vector("two words")]
    assert [d.embedding for d in result.data] == [pytest.approx(v, rel=1e-6) for v in expected]
    # Gemini's embedding calls report no token counts (contracts/gemini.md 6.3): zeros, said so.
    unreported = rig.kind == "gemini"
    assert result.usage.prompt_tokens == (0 if unreported else 3)
    assert raw.headers.get("x-phoenix-usage") == ("unreported" if unreported else None)
    wait_for(lambda: rig.audit.exists() and rig.audit_records())
    assert rig.audit_records()[-1].get("usage") == ("unreported" if unreported else None)


def test_an_ollama_embedding_answer_without_a_count_is_marked_unreported(
    start_gateway: Callable[..., ServerThread], tmp_path: Path
) -> None:
    fake = FakeOllama(models=["nomic-embed-text"])
    fake.embed_counts = False  # contracts/ollama.md 4: prompt_eval_count may be missing
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config("ollama", upstream.url, tmp_path / "audit.jsonl"))
        answer = httpx.post(gateway.url + "/v1/embeddings", json={"model": "embed", "input": "one"})
        samples = scrape(gateway.url)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert answer.headers["x-phoenix-usage"] == "unreported"
    assert ("gateway_tokens_total", (("backend", "b"), ("model", "embed"), ("type", "prompt"))) not in samples


def test_many_inputs_come_back_in_their_order(rig: Rig) -> None:
    texts = [f"chunk {i}" for i in range(250)]
    result = rig.api.embeddings.create(model="embed", input=texts, encoding_format="float")
    assert [d.index for d in result.data] == list(range(250))
    assert [d.embedding for d in result.data] == [rig.fake.vector(text) for text in texts]
    if rig.kind == "gemini":  # Google takes at most 100 inputs per batchEmbedContents call
        assert isinstance(rig.fake, FakeGemini)
        sizes = [len(body["requests"]) for path, body, _ in rig.fake.requests if "batchEmbed" in path]
        assert sizes == [100, 100, 50]


def test_token_id_input(rig: Rig) -> None:
    # What LangChain's OpenAIEmbeddings sends by default. The PII detector cannot read ids, so the
    # request is private: this rig's OpenAI backend is local and serves it, Ollama takes text
    # only, and Gemini is a cloud backend.
    answer = httpx.post(
        rig.gateway.url + "/v1/embeddings",
        json={"model": "embed", "input": [[1, 2, 3], [4, 5]], "encoding_format": "float"},
        timeout=10,
    )
    assert answer.headers["x-phoenix-privacy"] == "private;reason=token_ids"
    if rig.kind == "openai":
        assert isinstance(rig.fake, FakeOpenAI)
        assert answer.status_code == 200, answer.text
        vectors = [item["embedding"] for item in answer.json()["data"]]
        assert vectors == [rig.fake.vector("1 2 3"), rig.fake.vector("4 5")]
        assert answer.json()["usage"]["prompt_tokens"] == 5
        assert [body["input"] for path, body, _ in rig.fake.requests if path == "/v1/embeddings"] == [
            [[1, 2, 3], [4, 5]]
        ]
    elif rig.kind == "ollama":  # refused by the gateway: no backend was tried
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "input"
        assert "check_embedding_ctx_length=False" in answer.json()["error"]["message"]
        assert "x-phoenix-backend" not in answer.headers
    else:
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["code"] == "privacy_violation"
        assert not [path for path, *_ in rig.fake.requests if "embed" in path.lower()]


def test_upstream_429_keeps_its_meaning(rig: Rig) -> None:
    rig.fake.queue(Reply(status=429, error_text="slow down"))
    with pytest.raises(openai.RateLimitError) as caught:
        rig.api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert caught.value.type == "rate_limit_error"
    # The audit record (and the log line) name the error type the client got.
    wait_for(lambda: rig.audit.exists() and rig.audit_records())
    assert [(r["status"], r["error"]) for r in rig.audit_records()] == [(429, "rate_limit_error")]


def test_upstream_500_is_502(rig: Rig) -> None:
    rig.fake.queue(Reply(status=500, error_text="kaput"))
    with pytest.raises(openai.InternalServerError) as caught:
        rig.api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502
    samples = scrape(rig.gateway.url)
    assert sample(samples, "gateway_upstream_errors_total", backend="b", reason="status") == 1
    assert (
        sample(samples, "gateway_requests_total", endpoint="chat", model="chat", backend="b", status="502")
        == 1
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_504_is_504(rig: Rig, stream: bool) -> None:
    # The backend's own deadline ran out (Gemini's DEADLINE_EXCEEDED): a timeout, not a bad answer.
    rig.fake.queue(Reply(status=504, error_text="Deadline expired before operation could complete."))
    response = httpx.post(
        rig.gateway.url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": stream},
    )
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "server_error"


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_garbage_is_a_clean_error(rig: Rig, stream: bool) -> None:
    rig.fake.queue(Reply(garbage=True))
    response = httpx.post(
        rig.gateway.url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": stream},
    )
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "server_error"
    assert "Traceback" not in response.text


@pytest.mark.parametrize("kind", ["openai", "gemini"])
def test_upstream_api_key_is_sent_and_never_shown(
    start_gateway: Callable[..., ServerThread], kind: str
) -> None:
    """The backend refusing the gateway's key is the gateway's fault (502), never the client's key:
    Gemini says so with a 400 whose details read API_KEY_INVALID."""
    fake = FakeOpenAI(api_key=KEY) if kind == "openai" else FakeGemini(api_key=KEY)
    with serve(fake.app) as upstream:
        good = start_gateway(rig_config(kind, upstream.url), environ={"FAKE_KEY": KEY})
        bad = start_gateway(rig_config(kind, upstream.url), environ={"FAKE_KEY": "sk-wrong-secret"})
        body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(good.url + "/v1/chat/completions", json=body).status_code == 200
        sent = fake.requests[-1][2]
        assert (sent.get("authorization"), sent.get("x-goog-api-key")) == (
            (f"Bearer {KEY}", None) if kind == "openai" else (None, KEY)
        )
        refused = httpx.post(bad.url + "/v1/chat/completions", json=body)
    assert refused.status_code == 502
    assert refused.json()["error"]["type"] == "server_error"
    assert "api_key_env" in refused.json()["error"]["message"]
    assert "sk-wrong-secret" not in refused.text
    assert refused.headers["x-should-retry"] == "false"  # the OpenAI SDKs would retry a 502 twice


def test_embeddings_from_a_server_that_does_not_serve_them_are_a_400_and_no_fault_of_the_instance(
    start_gateway: Callable[..., ServerThread],
) -> None:
    # llama.cpp's server started without --embeddings answers 501: alive, serving chat. Taken for
    # a failure, three embedding requests ejected it from chat as well (/readyz 503).
    fake = FakeOpenAI(api_key=KEY, embeddings=False)
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config("openai", upstream.url), environ={"FAKE_KEY": KEY})
        wait_for(lambda: httpx.get(gateway.url + "/readyz").status_code == 200)
        for _ in range(3):
            response = httpx.post(gateway.url + "/v1/embeddings", json={"model": "embed", "input": "x"})
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["message"] == (
                "the OpenAI-compatible backend does not support this request (501):"
                " This server does not support embeddings. Start it with `--embeddings`"
            )
        assert sample(scrape(gateway.url), "gateway_backend_up", backend="b") == 1.0
        assert httpx.get(gateway.url + "/readyz").status_code == 200
        chat = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(gateway.url + "/v1/chat/completions", json=chat).status_code == 200


OVERFLOW_WORDS = {  # what each OpenAI-compatible server says of a prompt past its context of 8 tokens
    "llama.cpp": "request (9 tokens) exceeds the available context size (8 tokens), try increasing it",
    "vllm": "This model's maximum context length is 8 tokens. However, your request has 9 input"
    " tokens. Please reduce the length of the input messages.",
}


@pytest.mark.parametrize(
    ("server", "at_top"),
    [("llama.cpp", False), ("vllm", False), ("vllm", True)],
    ids=["llama.cpp", "vllm", "vllm-at-top"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_prompt_longer_than_an_openai_compatible_context_is_openais_context_length_exceeded(
    start_gateway: Callable[..., ServerThread], stream: bool, server: str, at_top: bool
) -> None:
    # llama.cpp's server says so with its own type (exceed_context_size_error) and a numeric code,
    # vLLM in OpenAI's words with a numeric code (400); the gateway dropped both codes, so LangChain
    # raised a bare BadRequestError, not the ContextOverflowError it raises against OpenAI. Older
    # vLLM releases (and SGLang) write the error at the top level of the body, which the client got
    # as that raw JSON, cut at 200 characters, for a message.
    fake = FakeOpenAI(api_key=KEY)
    fake.context_size, fake.context_server, fake.errors_at_top = 8, server, at_top
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config("openai", upstream.url), environ={"FAKE_KEY": KEY})
        body = {"model": "chat", "messages": [{"role": "user", "content": "word " * 9}], "stream": stream}
        response = httpx.post(gateway.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": OVERFLOW_WORDS[server],
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_prompt_longer_than_a_gemini_context_is_openais_context_length_exceeded(
    start_gateway: Callable[..., ServerThread], stream: bool
) -> None:
    # Gemini says it with a plain INVALID_ARGUMENT; the gateway left OpenAI's code null for it, so
    # LangChain's ChatOpenAI raised a bare BadRequestError here and ContextOverflowError (which its
    # agents trim the history on) for the same prompt served by llama.cpp's server.
    fake = FakeGemini(api_key=KEY)
    said = "The input token count (1200293) exceeds the maximum number of tokens allowed (1048576)."
    fake.queue(Reply(status=400, error_text=said))
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config("gemini", upstream.url), environ={"FAKE_KEY": KEY})
        body = {"model": "chat", "messages": [{"role": "user", "content": "word " * 9}], "stream": stream}
        response = httpx.post(gateway.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": f"Gemini rejected the request: {said}",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


def test_a_backends_configured_headers_reach_it_and_its_host_header_names_it(
    start_gateway: Callable[..., ServerThread],
) -> None:
    # A virtual host behind a proxy: the URL is the proxy's, the Host header the server's name.
    fake = FakeOpenAI(api_key=KEY)
    with serve(fake.app) as upstream:
        config = rig_config("openai", upstream.url)
        backend = config.backends[0].model_copy(update={"headers": {"Host": "llm.internal", "x-team": "icu"}})
        gateway = start_gateway(config.model_copy(update={"backends": [backend]}), environ={"FAKE_KEY": KEY})
        body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(gateway.url + "/v1/chat/completions", json=body).status_code == 200
        assert (
            httpx.post(gateway.url + "/v1/chat/completions", json={**body, "stream": True}).status_code == 200
        )
    for _, _, headers in fake.requests[-2:]:
        assert (headers["host"], headers["x-team"]) == ("llm.internal", "icu")


def test_openai_upstream_always_counts_tokens_when_streaming(
    start_gateway: Callable[..., ServerThread],
) -> None:
    fake = FakeOpenAI(api_key=KEY)
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config("openai", upstream.url), environ={"FAKE_KEY": KEY})
        body = {
            "model": "chat",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "metadata": {"privacy": "public"},
        }
        httpx.post(gateway.url + "/v1/chat/completions", json=body)
    sent = fake.chat_bodies()[-1]
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == "gpt-4o-mini"
    assert "metadata" not in sent


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_backend_that_reports_no_usage_gives_zeros_marked_unreported_and_counts_nothing(
    start_gateway: Callable[..., ServerThread], stream: bool
) -> None:
    # The contract's zeros for the client, said to be unreported; no tokens counted from them.
    fake = FakeOpenAI(api_key=KEY)
    fake.queue(Reply(content="Hello world", usage_missing=True))
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config("openai", upstream.url), environ={"FAKE_KEY": KEY})
        body: dict[str, Any] = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        answer = httpx.post(gateway.url + "/v1/chat/completions", json=body)
        samples = scrape(gateway.url)
    assert answer.status_code == 200
    zeros = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if stream:
        events = answer.text.split("\n\n")
        usage_at = next(i for i, event in enumerate(events) if '"usage":{' in event)
        assert events[usage_at - 1] == ": usage=unreported"
        assert json.loads(events[usage_at].removeprefix("data: "))["usage"] == zeros
        assert events[usage_at + 1] == "data: [DONE]"
    else:
        assert answer.json()["usage"] == zeros
        assert answer.headers["x-phoenix-usage"] == "unreported"
        assert answer.json()["choices"][0]["message"]["content"] == "Hello world"
    labels = {"endpoint": "chat", "model": "chat", "backend": "b", "status": "200"}
    assert sample(samples, "gateway_requests_total", **labels) == 1
    for kind in ("prompt", "completion"):
        assert ("gateway_tokens_total", (("backend", "b"), ("model", "chat"), ("type", kind))) not in samples


def _thinking_gateway(
    start_gateway: Callable[..., ServerThread], fake: FakeGemini, url: str
) -> openai.OpenAI:
    backend = {"name": "b", "type": "gemini", "base_url": url + "/v1beta", "api_key_env": "FAKE_KEY"}
    models = [{"name": m, "deployments": [{"backend": "b", "model": m}]} for m in fake.models]
    gateway = start_gateway(
        parse_config({"backends": [backend], "models": models}, "test"), {"FAKE_KEY": KEY}
    )
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="client", max_retries=0)


def _ask_with_reasoning_effort(api: openai.OpenAI, model: str, stream: bool) -> None:
    messages: Any = [{"role": "user", "content": "2+2?"}]
    if stream:
        with api.chat.completions.create(
            model=model, messages=messages, reasoning_effort="low", stream=True
        ) as chunks:
            assert list(chunks)
    else:
        assert api.chat.completions.create(model=model, messages=messages, reasoning_effort="low").choices


def test_reasoning_effort_reaches_only_gemini_models_whose_entry_says_they_think(
    start_gateway: Callable[..., ServerThread],
) -> None:
    """gemini-2.5-flash-image does not think (thinkingConfig would be a 400); the alias
    gemini-flash-latest does, and gets a budget; Gemini 3 a level. Each entry is asked once."""
    models = ["gemini-2.5-flash-image", "gemini-flash-latest", "gemini-3-pro-preview"]
    fake = FakeGemini(api_key=KEY, models=models, thinking=models[1:])
    with serve(fake.app) as upstream, _thinking_gateway(start_gateway, fake, upstream.url) as api:
        for model in models:
            for stream in (False, True):
                _ask_with_reasoning_effort(api, model, stream)
    sent = [body.get("generationConfig", {}).get("thinkingConfig") for body in fake.chat_bodies()]
    budget = {"thinkingBudget": 1024, "includeThoughts": True}
    level = {"thinkingLevel": "LOW", "includeThoughts": True}
    assert sent == [None, None, budget, budget, level, level]
    entries = [path for path, _, _ in fake.requests if path.startswith("/v1beta/models/") and ":" not in path]
    assert entries == [f"/v1beta/models/{model}" for model in models]


def test_reasoning_effort_sends_no_thinking_config_when_the_gemini_models_entry_cannot_be_had(
    start_gateway: Callable[..., ServerThread],
) -> None:
    fake = FakeGemini(api_key=KEY, thinking=[])  # had it been sent, thinkingConfig would be a 400
    fake.entry_status = 503
    with serve(fake.app) as upstream, _thinking_gateway(start_gateway, fake, upstream.url) as api:
        for stream in (False, True):
            _ask_with_reasoning_effort(api, "gemini-2.5-flash", stream)
    assert [body.get("generationConfig") for body in fake.chat_bodies()] == [None, None]


def test_unknown_fields_reach_only_backends_that_speak_openai(rig: Rig) -> None:
    extra = {"repetition_penalty": 1.1, "vendor_knob": {"depth": 2}}
    reply = rig.api.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "x"}], extra_body=extra
    )
    assert reply.choices[0].message.content
    sent = rig.upstream_bodies()[-1]
    kept = {name: sent[name] for name in extra if name in sent}
    # vLLM and llama.cpp read such fields; Ollama's and Gemini's native APIs have no place for them
    assert kept == (extra if rig.kind == "openai" else {})
    assert "vendor_knob" not in str(sent) or rig.kind == "openai"


def test_reasoning_effort_reaches_gemini_as_its_thinking_config(
    start_gateway: Callable[..., ServerThread], tmp_path: Path
) -> None:
    fake = FakeGemini(api_key=KEY)
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config("gemini", upstream.url), environ={"FAKE_KEY": KEY})
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="client", max_retries=0) as api:
            efforts: list[ReasoningEffort] = ["none", "high"]
            for effort in efforts:
                api.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": "2+2?"}], reasoning_effort=effort
                )
            with pytest.raises(openai.BadRequestError) as refused:
                # not one of the efforts: the gateway must refuse it with a 400 naming the field
                api.chat.completions.create(  # type: ignore[call-overload]
                    model="chat",
                    messages=[{"role": "user", "content": "2+2?"}],
                    reasoning_effort="bogus",
                )
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["param"] == "reasoning_effort"
    sent = [body["generationConfig"]["thinkingConfig"] for body in fake.chat_bodies()]
    assert sent == [
        {"thinkingBudget": 0, "includeThoughts": False},
        {"thinkingBudget": 24576, "includeThoughts": True},
    ]
