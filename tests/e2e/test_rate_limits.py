"""Rate limits per API key through the real gateway: OpenAI's 429 and `x-ratelimit-*` headers, the
token budget settled to what the backend counted, and one budget for two gateway processes
sharing a real `redis-server`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from gateway.config import Config, parse_config
from tests.e2e.conftest import ollama_config, sample, scrape, wait_for
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.servers import ServerThread, free_port, gateway_process, redis_server, serve, unaccepting_address

pytestmark = pytest.mark.e2e
SECRETS = {"CLINIC_KEY": "sk-clinic", "SCHOOL_KEY": "sk-school"}
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def keys(clinic: dict[str, int], school: dict[str, int] | None = None) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [{"name": "clinic", "key_env": "CLINIC_KEY", "limits": clinic}]
    entries.append({"name": "school", "key_env": "SCHOOL_KEY", **({"limits": school} if school else {})})
    return {"keys": entries}


_clients: list[openai.OpenAI] = []


def client(server: ServerThread | str, key: str = "sk-clinic") -> openai.OpenAI:
    url = server if isinstance(server, str) else server.url
    _clients.append(openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0))
    return _clients[-1]


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


@pytest.fixture
def limited(
    fake_ollama: tuple[FakeOllama, ServerThread], start_gateway: Callable[..., ServerThread]
) -> Callable[..., ServerThread]:
    def start(**overrides: Any) -> ServerThread:
        config: Config = ollama_config(fake_ollama[1].url, **overrides)
        return start_gateway(config, SECRETS)

    return start


def test_requests_per_minute_run_out_with_openais_429_and_headers(
    fake_ollama: tuple[FakeOllama, ServerThread], limited: Callable[..., ServerThread]
) -> None:
    fake = fake_ollama[0]
    gateway = limited(auth=keys(clinic={"rpm": 3}), rate_limits={"default": {"rpm": 100}})
    remaining = []
    for _ in range(3):
        raw = client(gateway).chat.completions.with_raw_response.create(model="llama3.2", messages=HI)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert "x-ratelimit-limit-tokens" not in raw.headers  # no token limit configured
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]

    with pytest.raises(openai.RateLimitError) as refused:  # a stream is refused before it starts
        client(gateway).chat.completions.create(model="llama3.2", messages=HI, stream=True)
    error = refused.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert "the API key 'clinic' on requests per minute: limit 3" in error.message
    assert error.response.headers["retry-after"] == "20"
    assert 19_000 < int(error.response.headers["retry-after-ms"]) <= 20_000
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(fake.chat_bodies()) == 3  # the refused request never reached the backend

    # the other key has its own budget, from the default
    raw = client(gateway, "sk-school").chat.completions.with_raw_response.create(
        model="llama3.2", messages=HI
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    samples = scrape(gateway.url)
    assert (
        sample(samples, "gateway_requests_total", endpoint="chat", status="429", backend="", model="llama3.2")
        == 1
    )


def test_tokens_per_minute_are_charged_what_the_backend_counted(
    fake_ollama: tuple[FakeOllama, ServerThread], limited: Callable[..., ServerThread]
) -> None:
    fake = fake_ollama[0]
    fake.default = Reply(content="one two three", prompt_eval_count=40, eval_count=50)  # 90 tokens
    gateway = limited(auth=keys(clinic={"tpm": 200}))
    first = client(gateway).chat.completions.with_raw_response.create(model="llama3.2", messages=HI)
    assert first.headers["x-ratelimit-limit-tokens"] == "200"
    assert first.headers["x-ratelimit-remaining-tokens"] == "199"  # estimate: "hi" is one token
    # the stream is settled too: 90 + 90 taken, so about 20 are left
    stream = client(gateway).chat.completions.create(model="llama3.2", messages=HI, stream=True)
    assert (
        "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "one two three"
    )
    third = client(gateway).chat.completions.with_raw_response.create(
        model="llama3.2", messages=HI, max_tokens=10
    )
    assert 9 <= int(third.headers["x-ratelimit-remaining-tokens"]) <= 10  # 20 - 11, plus a little refill
    with pytest.raises(openai.RateLimitError) as refused:  # now -70: 11 more need 81 tokens, 25 s
        client(gateway).chat.completions.create(model="llama3.2", messages=HI, max_tokens=10)
    assert "on tokens per minute: limit 200" in refused.value.message
    assert 24 <= int(refused.value.response.headers["retry-after"]) <= 25
    with pytest.raises(openai.RateLimitError) as too_large:
        client(gateway).chat.completions.create(model="llama3.2", messages=HI, max_tokens=500)
    assert "it may use 501 tokens" in too_large.value.message
    assert too_large.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.RateLimitError) as per_choice:  # max_tokens is each choice's
        client(gateway).chat.completions.create(model="llama3.2", messages=HI, max_tokens=150, n=2)
    assert "it may use 301 tokens" in per_choice.value.message
    assert len(fake.chat_bodies()) == 3


def test_each_keys_requests_and_tokens_are_counted_under_its_name(
    fake_ollama: tuple[FakeOllama, ServerThread], limited: Callable[..., ServerThread]
) -> None:
    fake = fake_ollama[0]
    fake.default = Reply(content="one two three", prompt_eval_count=40, eval_count=5)
    gateway = limited(auth=keys(clinic={"rpm": 2}))
    for _ in range(2):
        client(gateway).chat.completions.create(model="llama3.2", messages=HI)
    with pytest.raises(openai.RateLimitError):
        client(gateway).chat.completions.create(model="llama3.2", messages=HI)
    stream = client(gateway, "sk-school").chat.completions.create(model="llama3.2", messages=HI, stream=True)
    assert [chunk for chunk in stream]
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "sk-stranger").chat.completions.create(model="llama3.2", messages=HI)
    samples = scrape(gateway.url)
    counted = {labels: value for (name, labels), value in samples.items() if name.startswith("gateway_key_")}
    assert counted == {
        (("key", "clinic"), ("status", "200")): 2,
        (("key", "clinic"), ("status", "429")): 1,
        (("key", "school"), ("status", "200")): 1,
        (("key", "clinic"), ("type", "prompt")): 80,
        (("key", "clinic"), ("type", "completion")): 10,
        (("key", "school"), ("type", "prompt")): 40,
        (("key", "school"), ("type", "completion")): 5,
    }  # nothing for the unknown key: its 401 is in gateway_requests_total


def test_a_key_at_its_max_inflight_is_refused_while_its_stream_runs_and_admitted_after(
    fake_ollama: tuple[FakeOllama, ServerThread], limited: Callable[..., ServerThread]
) -> None:
    fake = fake_ollama[0]
    fake.queue(Reply(pieces=["slow", " stream", " of", " words"], delay_between=0.3))
    gateway = limited(auth=keys(clinic={"max_inflight": 1}))
    body = {"model": "llama3.2", "messages": HI, "stream": True}
    headers = {"authorization": "Bearer sk-clinic"}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=headers) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # under way
        with pytest.raises(openai.RateLimitError) as refused:
            client(gateway).chat.completions.create(model="llama3.2", messages=HI)
        assert (
            "Too many requests under way for the API key 'clinic': limit 1 at once" in refused.value.message
        )
        assert refused.value.response.headers["retry-after"] == "1"
        school = client(gateway, "sk-school").chat.completions.create(model="llama3.2", messages=HI)
        assert school.choices[0].message.content  # another key is not held back
        assert [line for line in lines if line][-1] == "data: [DONE]"
    answer = client(gateway).chat.completions.create(model="llama3.2", messages=HI)
    assert answer.choices[0].finish_reason == "stop"
    assert len(fake.chat_bodies()) == 3


@pytest.fixture
def frozen() -> Iterator[str]:
    """A backend address that never accepts a connection."""
    with unaccepting_address() as url:
        yield url


def test_requests_that_reach_no_backend_cost_no_tokens(
    fake_ollama: tuple[FakeOllama, ServerThread], start_gateway: Callable[..., ServerThread], frozen: str
) -> None:
    fake, server = fake_ollama
    config = parse_config(
        {
            "backends": [
                {"name": "ollama-1", "type": "ollama", "base_url": server.url, "max_inflight": 1},
                {"name": "down", "type": "ollama", "base_url": f"http://127.0.0.1:{free_port()}"},
                {"name": "frozen", "type": "ollama", "base_url": frozen, "timeouts": {"connect": 0.2}},
            ],
            "models": [
                {"name": "llama3.2", "deployments": [{"backend": "ollama-1", "model": "llama3.2:latest"}]},
                {"name": "elsewhere", "deployments": [{"backend": "down", "model": "llama3.2:latest"}]},
                {"name": "far", "deployments": [{"backend": "frozen", "model": "llama3.2:latest"}]},
            ],
            "routing": {"max_wait": 0.2},
            "auth": keys(clinic={"tpm": 1000}),
        },
        "test",
    )
    gateway = start_gateway(config, SECRETS)
    headers = {"authorization": "Bearer sk-clinic"}

    def post(model: str, max_tokens: int, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": HI, "max_tokens": max_tokens, **extra}
        return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)

    fake.default = Reply(delay_first=1.0)
    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(post, "llama3.2", 1)  # takes ollama-1's only slot
        wait_for(lambda: len(fake.chat_bodies()) == 1)
        capped = post("llama3.2", 400)  # the pool's own 429 after max_wait
        refused = [post("elsewhere", 400), post("elsewhere", 400, stream=True)]  # connection refused
        untaken = [post("far", 400), post("far", 400, stream=True)]  # the connection was never accepted
        assert holding.result(timeout=10).status_code == 200
    assert capped.status_code == 429 and capped.json()["error"]["message"].startswith("backend ollama-1")
    assert [r.status_code for r in refused] == [503, 503]
    assert [r.status_code for r in untaken] == [504, 504]

    # five estimates of 401 tokens would have spent the budget; none was kept
    fake.default = Reply(content="fine")
    after = post("llama3.2", 10)
    assert after.status_code == 200
    assert int(after.headers["x-ratelimit-remaining-tokens"]) > 900

    fake.default = Reply(status=500)  # it reached the backend, which failed: the estimate stays
    assert post("llama3.2", 400).status_code == 502
    fake.default = Reply(content="fine")
    assert int(post("llama3.2", 10).headers["x-ratelimit-remaining-tokens"]) < 700


@pytest.mark.parametrize("end", ["client cuts it", "backend breaks it"])
def test_a_stream_ended_before_its_count_is_charged_what_it_relayed(
    fake_ollama: tuple[FakeOllama, ServerThread], limited: Callable[..., ServerThread], end: str
) -> None:
    # No max_tokens, as chat UIs send: the estimate is the prompt's few tokens; the count that
    # would settle it comes last, and never does.
    fake = fake_ollama[0]
    gateway = limited(auth=keys(clinic={"tpm": 100}))
    broken = end == "backend breaks it"
    fake.default = Reply(pieces=["tok "] * 300, error_after=150 if broken else None, delay_between=0.001)
    body = {"model": "llama3.2", "messages": HI, "stream": True}
    headers = {"authorization": "Bearer sk-clinic"}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=10
    ) as answer:
        assert answer.status_code == 200
        read = 0
        for line in answer.iter_lines():
            read += line.startswith('data: {"id"')
            if read == 150 and not broken:
                break  # "stop generating"
    labels = {
        "endpoint": "chat",
        "model": "llama3.2",
        "backend": "ollama-1",
        "status": "502" if broken else "499",
    }
    wait_for(lambda: sample(scrape(gateway.url), "gateway_requests_total", **labels) == 1, 5)  # settled
    after = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "llama3.2", "messages": HI}, headers=headers
    )
    assert after.status_code == 429, after.text  # about 150 tokens relayed against 100 a minute


def test_embeddings_a_backend_does_not_count_keep_their_estimate(
    start_gateway: Callable[..., ServerThread],
) -> None:
    gemini = FakeGemini(api_key="gm-upstream")  # batchEmbedContents reports no token count
    with serve(gemini.app) as upstream:
        config = parse_config(
            {
                "backends": [
                    {
                        "name": "gemini",
                        "type": "gemini",
                        "base_url": upstream.url + "/v1beta",
                        "api_key_env": "GM",
                    }
                ],
                "models": [
                    {"name": "embed", "deployments": [{"backend": "gemini", "model": "gemini-embedding-001"}]}
                ],
                "auth": keys(clinic={"tpm": 100}),
            },
            "test",
        )
        gateway = start_gateway(config, {**SECRETS, "GM": "gm-upstream"})
        text = "a sentence of forty bytes, more or less. " * 6  # about 60 tokens by the estimate
        answers = [
            httpx.post(
                gateway.url + "/v1/embeddings",
                json={"model": "embed", "input": text},
                headers={"authorization": "Bearer sk-clinic"},
                timeout=10,
            )
            for _ in range(3)
        ]
    assert answers[0].status_code == 200, answers[0].text
    assert answers[-1].status_code == 429, answers[-1].text  # 180 tokens' worth against 100 a minute


def test_token_ids_a_backend_would_refuse_cost_nothing(
    fake_ollama: tuple[FakeOllama, ServerThread], limited: Callable[..., ServerThread]
) -> None:
    gateway = limited(auth=keys(clinic={"tpm": 1000}))
    answers = [
        httpx.post(
            gateway.url + "/v1/embeddings",
            json={"model": "embed", "input": [[7] * 600]},  # Ollama takes text only
            headers={"authorization": "Bearer sk-clinic"},
            timeout=10,
        )
        for _ in range(2)
    ]
    assert [a.status_code for a in answers] == [400, 400], answers[-1].text  # not 429: nothing kept
    error = answers[-1].json()["error"]
    assert error["param"] == "input"
    assert "'embed'" in error["message"] and "ollama-1 (Ollama)" in error["message"]
    assert "x-phoenix-backend" not in answers[-1].headers  # none was tried
    assert not [path for path, _ in fake_ollama[0].requests if path == "/api/embed"]


def test_an_open_gateway_limits_its_anonymous_callers_together(
    fake_ollama: tuple[FakeOllama, ServerThread], limited: Callable[..., ServerThread]
) -> None:
    gateway = limited(rate_limits={"default": {"rpm": 2}})
    for _ in range(2):
        assert (
            httpx.post(gateway.url + "/v1/embeddings", json={"model": "embed", "input": "x"}).status_code
            == 200
        )
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "llama3.2", "messages": HI})
    assert response.status_code == 429
    assert "callers without an API key" in response.json()["error"]["message"]


def test_unlimited_keys_get_no_rate_limit_headers(gateway: ServerThread) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "llama3.2", "messages": HI})
    assert response.status_code == 200
    assert not [name for name in response.headers if name.startswith("x-ratelimit")]


def test_an_unreachable_redis_is_logged_and_lets_requests_through_unless_told_to_fail_closed(
    limited: Callable[..., ServerThread],
) -> None:
    nowhere = "redis://127.0.0.1:9/0"  # the discard port: nothing listens
    open_ = limited(auth=keys(clinic={"rpm": 1}), rate_limits={"redis_url": nowhere})
    for _ in range(2):
        assert client(open_).chat.completions.create(model="llama3.2", messages=HI).choices
    closed = limited(auth=keys(clinic={"rpm": 1}), rate_limits={"redis_url": nowhere, "fail_open": False})
    with pytest.raises(openai.InternalServerError) as refused:
        client(closed).chat.completions.create(model="llama3.2", messages=HI)
    assert refused.value.status_code == 503
    assert "rate-limit store (Redis) is unreachable" in refused.value.message


@pytest.fixture
def two_gateways(fake_ollama: tuple[FakeOllama, ServerThread], tmp_path: Path) -> Iterator[list[str]]:
    with redis_server(tmp_path) as url:
        config = ollama_config(fake_ollama[1].url).model_dump(mode="json", exclude_unset=True)
        config["auth"] = keys(clinic={"rpm": 4, "tpm": 1000})
        config["rate_limits"] = {"redis_url": url}
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, **SECRETS}
        with (
            gateway_process(["--config", str(path)], tmp_path / "a.log", env) as a,
            gateway_process(["--config", str(path)], tmp_path / "b.log", env) as b,
        ):
            yield [a.url, b.url]


def test_two_gateway_processes_share_one_budget_through_redis(
    fake_ollama: tuple[FakeOllama, ServerThread], two_gateways: list[str]
) -> None:
    fake = fake_ollama[0]
    remaining = []
    for i in range(4):
        raw = client(two_gateways[i % 2]).chat.completions.with_raw_response.create(
            model="llama3.2", messages=HI
        )
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["3", "2", "1", "0"]
    for url in two_gateways:
        with pytest.raises(openai.RateLimitError) as refused:
            client(url).chat.completions.create(model="llama3.2", messages=HI)
        assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert 14 <= int(refused.value.response.headers["retry-after"]) <= 15  # 60/4 s
    assert len(fake.chat_bodies()) == 4
