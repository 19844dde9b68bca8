"""POST /v1/completions, OpenAI's legacy text completions, served as chat: the official SDK's
`completions.create` against every backend kind, the answers checked against OpenAI's own schemas,
the refusals, and the books (metrics, one audit record per request)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from jsonschema import Draft202012Validator

from gateway.config import Config
from tests.e2e.conftest import Rig, ollama_config, rig_config, sample, scrape, wait_for
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, serve

pytestmark = pytest.mark.e2e
SPEC: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "data" / "openai-completions.json").read_text()
)
PROMPTS = ["First:", "Second:", "Third:"]


def spec(name: str, *, event: bool = False) -> Draft202012Validator:
    """A validator for one of OpenAI's schemas. A stream's events have the answer's shape, but
    OpenAI writes `finish_reason: null` until a choice's last event, which the schema leaves out."""
    schemas = copy.deepcopy(SPEC["components"]["schemas"])
    if event:
        finish = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]
        finish["finish_reason"] = {"anyOf": [finish["finish_reason"], {"type": "null"}]}
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}})


def sent_prompt(kind: str, body: dict[str, Any]) -> str:
    """The user message a backend received, in its native form."""
    if kind == "gemini":
        [content] = body["contents"]
        assert content["role"] == "user"
        return str(content["parts"][0]["text"])
    [message] = body["messages"]
    assert message["role"] == "user"
    return str(message["content"])


def sent_max_tokens(kind: str, body: dict[str, Any]) -> int:
    if kind == "ollama":
        return int(body["options"]["num_predict"])
    return int(body["generationConfig"]["maxOutputTokens"] if kind == "gemini" else body["max_tokens"])


def events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_a_prompt_is_one_user_message_and_its_answer_is_text(rig: Rig) -> None:
    rig.fake.queue(Reply(content="Hello world", prompt_eval_count=7, eval_count=2))
    raw = rig.api.completions.with_raw_response.create(model="chat", prompt="Say hi")
    reply = raw.parse()
    spec("CreateCompletionResponse").validate(raw.http_response.json())
    assert (reply.object, reply.model, reply.id[:5]) == ("text_completion", "chat", "cmpl-")
    assert [(c.text, c.index, c.finish_reason, c.logprobs) for c in reply.choices] == [
        ("Hello world", 0, "stop", None)
    ]
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (7, 2, 9)
    [sent] = rig.upstream_bodies()
    assert sent_prompt(rig.kind, sent) == "Say hi"
    assert sent_max_tokens(rig.kind, sent) == 16  # OpenAI's default for this endpoint
    assert raw.http_response.headers["x-phoenix-backend"] == "b"
    assert raw.http_response.headers["x-phoenix-privacy"] == "public"
    samples = scrape(rig.gateway.url)
    labels = {"model": "chat", "backend": "b"}
    assert sample(samples, "gateway_requests_total", endpoint="completions", status="200", **labels) == 1
    assert sample(samples, "gateway_requests_total", endpoint="chat", status="200", **labels) == 0
    assert sample(samples, "gateway_tokens_total", type="completion", **labels) == 2
    wait_for(lambda: rig.audit.exists() and rig.audit_records())
    [record] = rig.audit_records()
    assert (record["endpoint"], record["status"], record["backend"], record["prompt_tokens"]) == (
        "completions",
        200,
        "b",
        7,
    )
    assert record["request_id"] == raw.http_response.headers["x-request-id"]
    assert "Say hi" not in rig.audit.read_text()


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_stream_is_text_completion_events(rig: Rig, include_usage: bool) -> None:
    rig.fake.queue(Reply(pieces=["Hel", "lo ", "there"], prompt_eval_count=4, eval_count=3))
    chunks = list(
        rig.api.completions.create(
            model="chat",
            prompt="hi",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True} if include_usage else None,
        )
    )
    assert len({(c.id, c.created, c.object) for c in chunks}) == 1
    assert chunks[0].object == "text_completion" and chunks[0].id.startswith("cmpl-")
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    usage = [c for c in chunks if not c.choices]
    if include_usage:
        assert len(usage) == 1 and usage[0] is chunks[-1]
        assert usage[0].usage is not None and usage[0].usage.total_tokens == 7
    else:
        assert usage == [] and all(c.usage is None for c in chunks)
    assert sent_max_tokens(rig.kind, rig.upstream_bodies()[-1]) == 5


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_list_of_prompts_is_a_chat_request_each_answered_in_order(rig: Rig, stream: bool) -> None:
    rig.fake.default = Reply(content="Hello there!", prompt_eval_count=5, eval_count=2)
    if stream:
        texts: dict[int, str] = {}
        for chunk in rig.api.completions.create(
            model="chat", prompt=PROMPTS, echo=True, stream=True, stream_options={"include_usage": True}
        ):
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
            usage = chunk.usage
        assert texts == {i: prompt + "Hello there!" for i, prompt in enumerate(PROMPTS)}
    else:
        reply = rig.api.completions.create(model="chat", prompt=PROMPTS, echo=True)
        assert [(c.index, c.text) for c in reply.choices] == [
            (i, prompt + "Hello there!") for i, prompt in enumerate(PROMPTS)
        ]
        usage = reply.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (15, 6)
    assert sorted(sent_prompt(rig.kind, body) for body in rig.upstream_bodies()) == sorted(PROMPTS)
    wait_for(lambda: rig.audit.exists() and rig.audit_records())
    time.sleep(0.1)  # a second record would have come by now
    [record] = rig.audit_records()  # one request, one record, whatever it took upstream
    assert (record["endpoint"], record["completion_tokens"]) == ("completions", 6)
    samples = scrape(rig.gateway.url)
    assert sum(v for (name, labels), v in samples.items() if name == "gateway_requests_total") == 1


def test_stop_and_fields_the_gateway_does_not_know_pass_on_as_on_chat(rig: Rig) -> None:
    rig.api.completions.create(
        model="chat",
        prompt="count",
        stop=["\n", "END"],
        temperature=0,
        extra_body={"repetition_penalty": 1.1},
    )
    [sent] = rig.upstream_bodies()
    if rig.kind == "ollama":
        assert (sent["options"]["stop"], sent["options"]["temperature"]) == (["\n", "END"], 0)
    elif rig.kind == "gemini":
        assert sent["generationConfig"]["stopSequences"] == ["\n", "END"]
    else:
        assert (sent["stop"], sent["temperature"], sent["repetition_penalty"]) == (["\n", "END"], 0, 1.1)
    assert "repetition_penalty" not in json.dumps(sent) or rig.kind == "openai"


@pytest.mark.parametrize("rig", ["openai"], indirect=True)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_n_choices_for_each_prompt_are_numbered_prompt_by_prompt(rig: Rig, stream: bool) -> None:
    rig.fake.default = Reply(content="ok", prompt_eval_count=3, eval_count=1)
    prompts = ["a:", "b:"]
    texts: dict[int, str] = {}
    if stream:
        for chunk in rig.api.completions.create(model="chat", prompt=prompts, n=2, echo=True, stream=True):
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
    else:
        reply = rig.api.completions.create(model="chat", prompt=prompts, n=2, best_of=2, echo=True)
        texts = {choice.index: choice.text for choice in reply.choices}
    assert texts == {0: "a:ok", 1: "a:ok", 2: "b:ok", 3: "b:ok"}
    assert all(body["n"] == 2 for body in rig.upstream_bodies())


@pytest.mark.parametrize("rig", ["ollama"], indirect=True)
def test_n_on_ollama_is_refused_naming_n(rig: Rig) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        rig.api.completions.create(model="chat", prompt="x", n=2)
    assert refused.value.param == "n"


@pytest.mark.parametrize("rig", ["openai"], indirect=True)
def test_logprobs_come_in_the_legacy_shape(rig: Rig) -> None:
    rig.fake.default = Reply(pieces=["Hel", "lo"])
    raw = rig.api.completions.with_raw_response.create(model="chat", prompt="x", logprobs=2)
    spec("CreateCompletionResponse").validate(raw.http_response.json())
    logprobs = raw.parse().choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["Hel", "lo"]
    assert logprobs.token_logprobs == [-0.5, -1.0]
    assert logprobs.text_offset == [0, 3]
    assert logprobs.top_logprobs == [{"Hel": -0.5, "alt0": -1.5}, {"lo": -1.0, "alt0": -2.0}]
    assert (rig.upstream_bodies()[-1]["logprobs"], rig.upstream_bodies()[-1]["top_logprobs"]) == (True, 2)
    streamed = [
        choice.logprobs
        for chunk in rig.api.completions.create(model="chat", prompt="x", logprobs=0, stream=True)
        for choice in chunk.choices
        if choice.logprobs
    ]
    assert [(p.tokens, p.text_offset, p.top_logprobs) for p in streamed] == [
        (["Hel"], [0], [{"Hel": -0.5}]),
        (["lo"], [3], [{"lo": -1.0}]),
    ]


def test_the_answers_match_openais_schemas(rig: Rig) -> None:
    body = {"model": "chat", "prompt": PROMPTS[:2], "echo": True, "stop": "x", "max_tokens": 8}
    answer = httpx.post(rig.gateway.url + "/v1/completions", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    spec("CreateCompletionResponse").validate(answer.json())
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", rig.gateway.url + "/v1/completions", json=stream, timeout=10) as response:
        data = events(response)
    assert data[-1] == "[DONE]" and len(data) > 3
    for event in data[:-1]:
        spec("CreateCompletionResponse", event=True).validate(json.loads(event))
    assert json.loads(data[-2])["choices"] == [] and "usage" in json.loads(data[-2])
    assert all("usage" not in json.loads(event) for event in data[:-2])


@pytest.fixture
def fake(fake_ollama: tuple[FakeOllama, ServerThread]) -> FakeOllama:
    return fake_ollama[0]


@pytest.fixture
def url(fake_ollama: tuple[FakeOllama, ServerThread], start_gateway: Callable[[Config], ServerThread]) -> str:
    return start_gateway(ollama_config(fake_ollama[1].url)).url + "/v1/completions"


REFUSED = [
    ({"prompt": [1212, 318, 257]}, "prompt", "token ids"),
    ({"prompt": [[1212, 318], [257]]}, "prompt", "token ids"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": None}, "prompt", "string"),
    ({"prompt": ...}, "prompt", "Missing"),  # left out
    ({"prompt": ["a"] * 129}, "prompt", "at most 128"),
    ({"suffix": "end"}, "suffix", "inserts"),
    ({"best_of": 3}, "best_of", "equal 'n'"),
    ({"best_of": 3, "n": 2}, "best_of", "equal 'n'"),
    ({"echo": True, "logprobs": 0}, "echo", "prompt's log probabilities"),
    ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"logprobs": True}, "logprobs", "integer"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "/v1/chat/completions"),
    ({"tools": []}, "tools", "/v1/chat/completions"),
    ({"top_logprobs": 2}, "top_logprobs", "/v1/chat/completions"),
    ({"functions": []}, "functions", "deprecated"),
    ({"n": 2}, "n", "Ollama"),  # refused by the backend's translation, as on chat
]


@pytest.mark.parametrize(
    ("fields", "param", "words"), REFUSED, ids=[r[1] + ":" + str(i) for i, r in enumerate(REFUSED)]
)
def test_what_cannot_be_served_is_a_400_naming_the_field(
    url: str, fake: FakeOllama, fields: dict[str, Any], param: str, words: str
) -> None:
    body = {
        key: value
        for key, value in {"model": "llama3.2", "prompt": "hi", **fields}.items()
        if value is not ...
    }
    answer = httpx.post(url, json=body, timeout=10)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert words in error["message"]
    assert fake.chat_bodies() == []
    assert answer.headers["x-request-id"]


def test_best_of_equal_to_n_and_null_suffix_are_served(url: str) -> None:
    body = {"model": "llama3.2", "prompt": "hi", "best_of": 1, "n": 1, "suffix": None, "logprobs": None}
    assert httpx.post(url, json=body, timeout=10).status_code == 200


def test_get_is_405_and_a_base_url_without_v1_is_told(url: str) -> None:
    assert httpx.get(url).status_code == 405
    missing = httpx.post(url.replace("/v1/", "/"), json={})
    assert missing.status_code == 404
    assert "Did you mean POST /v1/completions?" in missing.json()["error"]["message"]


def test_a_prompt_past_the_context_is_about_the_prompt(
    start_gateway: Callable[..., ServerThread],
) -> None:
    backend = FakeOpenAI()
    backend.context_size = 3
    with serve(backend.app) as upstream:
        gateway = start_gateway(rig_config("openai", upstream.url, api_key_env=None))
        answer = httpx.post(
            gateway.url + "/v1/completions",
            json={"model": "chat", "prompt": "one two three four"},
            timeout=10,
        )
    assert answer.status_code == 400
    assert (answer.json()["error"]["code"], answer.json()["error"]["param"]) == (
        "context_length_exceeded",
        "prompt",
    )


def test_a_failure_mid_stream_is_an_error_event(url: str, fake: FakeOllama) -> None:
    fake.queue(Reply(pieces=["a", "b", "c"], error_after=1))
    with httpx.stream(
        "POST", url, json={"model": "llama3.2", "prompt": "x", "stream": True}, timeout=10
    ) as r:
        data = events(r)
    assert json.loads(data[0])["choices"][0]["text"] == "a"
    assert "error" in json.loads(data[-1]) and "[DONE]" not in data


def test_a_client_that_leaves_a_stream_of_several_prompts_stops_every_upstream(
    url: str, fake: FakeOllama
) -> None:
    fake.default = Reply(pieces=["x"] * 200, delay_between=0.05)
    body = {"model": "llama3.2", "prompt": ["a", "b"], "stream": True}
    with httpx.stream("POST", url, json=body, timeout=10) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    wait_for(lambda: fake.cancelled == 2)
    assert fake.cancelled == 2 and fake.completed_streams == 0
    samples = scrape(url.removesuffix("/v1/completions"))
    assert (
        sample(
            samples,
            "gateway_requests_total",
            endpoint="completions",
            model="llama3.2",
            backend="ollama-1",
            status="499",
        )
        == 1
    )
