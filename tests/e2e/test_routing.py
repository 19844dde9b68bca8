"""Routing through the real gateway: retries on other instances, fallbacks, API keys, Ollama's cloud
models, and the hash-chained audit file."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.cli import main
from gateway.config import Config, parse_config
from tests.e2e.conftest import sample, scrape, wait_for
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, TlsFiles, free_port, gateway_process, serve
from tests.test_audit import locked_elsewhere

pytestmark = pytest.mark.e2e
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@pytest.fixture
def two_ollamas() -> Iterator[tuple[FakeOllama, ServerThread, FakeOllama, ServerThread]]:
    first, second = FakeOllama(), FakeOllama(models=["llama3.2:latest", "qwen2.5:0.5b"])
    with serve(first.app) as one, serve(second.app) as two:
        yield first, one, second, two


def pool_config(*urls: str, **extra: Any) -> Config:
    backends = [{"name": f"ollama-{i}", "type": "ollama", "base_url": url} for i, url in enumerate(urls, 1)]
    deployments = [{"backend": b["name"], "model": "llama3.2:latest"} for b in backends]
    return parse_config(
        {"backends": backends, "models": [{"name": "llama", "deployments": deployments}], **extra}, "test"
    )


def test_an_instance_that_refuses_connections_is_skipped(
    two_ollamas: tuple[FakeOllama, ServerThread, FakeOllama, ServerThread],
    start_gateway: Callable[..., ServerThread],
) -> None:
    _, _, second, two = two_ollamas
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = start_gateway(pool_config(dead, two.url, routing={"strategy": "round_robin"}))
    for stream in (False, True, False, True):
        answer = httpx.post(
            gateway.url + "/v1/chat/completions", json={"model": "llama", "messages": HELLO, "stream": stream}
        )
        assert answer.status_code == 200
        assert answer.headers["x-phoenix-backend"] == "ollama-2"
    assert len(second.chat_bodies()) == 4
    samples = scrape(gateway.url)
    assert sample(samples, "gateway_retries_total", backend="ollama-1") >= 2
    assert sample(samples, "gateway_upstream_errors_total", backend="ollama-1", reason="connect") >= 2


def test_a_stream_that_fails_after_it_started_is_not_retried(
    two_ollamas: tuple[FakeOllama, ServerThread, FakeOllama, ServerThread],
    start_gateway: Callable[..., ServerThread],
) -> None:
    first, one, second, two = two_ollamas
    broken = Reply(content="one two three four", error_after=2)
    first.default = second.default = broken
    gateway = start_gateway(pool_config(one.url, two.url))
    body = {"model": "llama", "messages": HELLO, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
        events = [line for line in response.iter_lines() if line]
    assert response.status_code == 200
    assert json.loads(events[-1].removeprefix("data: "))["error"]["type"] == "server_error"
    assert len(first.chat_bodies()) + len(second.chat_bodies()) == 1
    assert sample(scrape(gateway.url), "gateway_retries_total", backend="ollama-1") == 0


def test_retries_are_bounded_by_the_config(start_gateway: Callable[..., ServerThread]) -> None:
    fakes = [FakeOllama() for _ in range(4)]
    for fake in fakes:
        fake.default = Reply(status=500)
    with (
        serve(fakes[0].app) as a,
        serve(fakes[1].app) as b,
        serve(fakes[2].app) as c,
        serve(fakes[3].app) as d,
    ):
        gateway = start_gateway(pool_config(a.url, b.url, c.url, d.url, routing={"retries": 1}))
        answer = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "llama", "messages": HELLO})
    assert answer.status_code == 502
    assert sum(len(fake.chat_bodies()) for fake in fakes) == 2  # the first try and one retry


def fallback_config(primary_url: str, spare_url: str) -> Config:
    return parse_config(
        {
            "backends": [
                {"name": "primary", "type": "ollama", "base_url": primary_url},
                {"name": "spare", "type": "ollama", "base_url": spare_url},
            ],
            "models": [
                {
                    "name": "big",
                    "deployments": [{"backend": "primary", "model": "llama3.2"}],
                    "fallbacks": ["small"],
                },
                {"name": "small", "deployments": [{"backend": "spare", "model": "qwen2.5:0.5b"}]},
            ],
        },
        "test",
    )


def test_fallbacks_serve_public_traffic_when_every_deployment_fails(
    two_ollamas: tuple[FakeOllama, ServerThread, FakeOllama, ServerThread],
    start_gateway: Callable[..., ServerThread],
) -> None:
    _, _, spare, two = two_ollamas
    gateway = start_gateway(fallback_config(f"http://127.0.0.1:{free_port()}", two.url))
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as api:
        reply = api.chat.completions.create(model="big", messages=HELLO)
        chunks = list(api.chat.completions.create(model="big", messages=HELLO, stream=True))
    assert reply.model == "small"  # the answer says which model answered
    assert {chunk.model for chunk in chunks} == {"small"}
    assert [body["model"] for body in spare.chat_bodies()] == ["qwen2.5:0.5b", "qwen2.5:0.5b"]
    assert sample(scrape(gateway.url), "gateway_fallbacks_total", from_model="big", to_model="small") == 2


def test_fallbacks_total_counts_the_fallback_that_served_not_those_tried(
    two_ollamas: tuple[FakeOllama, ServerThread, FakeOllama, ServerThread],
    start_gateway: Callable[..., ServerThread],
) -> None:
    """`big` falls back to `small`, then `tiny`. A request that `small` failed and `tiny` served
    counts once, for `tiny`; a request that every fallback failed counts none."""
    broken, one, spare, two = two_ollamas
    broken.default = Reply(status=500)
    backends = {"primary": f"http://127.0.0.1:{free_port()}", "broken": one.url, "spare": two.url}
    config = parse_config(
        {
            "backends": [{"name": name, "type": "ollama", "base_url": url} for name, url in backends.items()],
            "models": [
                {"name": "big", "deployments": [{"backend": "primary", "model": "llama3.2"}],
                 "fallbacks": ["small", "tiny"]},
                {"name": "small", "deployments": [{"backend": "broken", "model": "llama3.2"}]},
                {"name": "tiny", "deployments": [{"backend": "spare", "model": "qwen2.5:0.5b"}]},
            ],
        },
        "test",
    )  # fmt: skip
    gateway = start_gateway(config)
    served = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "big", "messages": HELLO})
    assert served.status_code == 200
    assert served.json()["model"] == "tiny"
    spare.default = Reply(status=500)
    failed = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "big", "messages": HELLO})
    assert failed.status_code == 502
    assert len(broken.chat_bodies()) == 2  # `small` was tried both times
    samples = scrape(gateway.url)
    assert sample(samples, "gateway_fallbacks_total", from_model="big", to_model="small") == 0
    assert sample(samples, "gateway_fallbacks_total", from_model="big", to_model="tiny") == 1


def test_a_key_is_never_served_by_a_fallback_outside_its_globs(
    two_ollamas: tuple[FakeOllama, ServerThread, FakeOllama, ServerThread],
    start_gateway: Callable[..., ServerThread],
) -> None:
    """The fallbacks were not checked against the key: a key allowed only `big` got `small`'s
    answers whenever `big` failed, although asking for `small` itself was a 403."""
    _, _, spare, two = two_ollamas
    config = fallback_config(f"http://127.0.0.1:{free_port()}", two.url)
    digests = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("sk-big", "sk-both")}
    auth = {
        "keys": [
            {"name": "big-only", "key_sha256": digests["sk-big"], "models": ["big"]},
            {"name": "both", "key_sha256": digests["sk-both"], "models": ["big", "sm*"]},
        ]
    }
    gateway = start_gateway(parse_config({**config.model_dump(exclude_defaults=True), "auth": auth}, "test"))

    def ask(key: str, model: str, stream: bool = False) -> httpx.Response:
        body = {"model": model, "messages": HELLO, "stream": stream}
        headers = {"authorization": f"Bearer {key}"}
        return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)

    assert ask("sk-big", "small").status_code == 403
    for stream in (False, True):
        refused = ask("sk-big", "big", stream)
        assert refused.status_code == 503, refused.text  # the primary's own failure
        assert "Cannot connect" in refused.json()["error"]["message"]
    assert spare.chat_bodies() == []
    served = ask("sk-both", "big")  # a key that may use the fallback still gets it
    assert (served.status_code, served.json()["model"]) == (200, "small")


def test_a_model_missing_on_every_deployment_falls_back(
    two_ollamas: tuple[FakeOllama, ServerThread, FakeOllama, ServerThread],
    start_gateway: Callable[..., ServerThread],
) -> None:
    first, one, spare, two = two_ollamas
    first.models = []  # removed from the primary
    gateway = start_gateway(fallback_config(one.url, two.url))
    answer = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "big", "messages": HELLO})
    assert answer.status_code == 200
    assert answer.json()["model"] == "small"
    assert len(first.chat_bodies()) == 1 and len(spare.chat_bodies()) == 1


def test_a_client_error_does_not_fall_back(
    two_ollamas: tuple[FakeOllama, ServerThread, FakeOllama, ServerThread],
    start_gateway: Callable[..., ServerThread],
) -> None:
    first, one, spare, two = two_ollamas
    first.default = Reply(status=400, error_text="invalid option")
    gateway = start_gateway(fallback_config(one.url, two.url))
    answer = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "big", "messages": HELLO})
    assert answer.status_code == 400
    assert spare.chat_bodies() == []


def test_private_traffic_never_falls_back(
    two_ollamas: tuple[FakeOllama, ServerThread, FakeOllama, ServerThread],
    start_gateway: Callable[..., ServerThread],
) -> None:
    _, _, spare, two = two_ollamas
    gateway = start_gateway(fallback_config(f"http://127.0.0.1:{free_port()}", two.url))
    answer = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "big", "messages": HELLO},
        headers={"x-privacy": "private"},
    )
    assert answer.status_code == 503
    assert spare.chat_bodies() == []


# ---- API keys ----

SECRET = "sk-clinic-5f2b9c"


def keyed_config(url: str) -> Config:
    return parse_config(
        {
            "auth": {
                "keys": [
                    {
                        "name": "clinic",
                        "key_sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                        "models": ["llama*"],
                        "privacy": "private",
                    },
                    {"name": "ops", "key_env": "OPS_KEY"},
                ]
            },
            "backends": [{"name": "ollama-1", "type": "ollama", "base_url": url}],
            "models": [
                {"name": "llama3.2", "deployments": [{"backend": "ollama-1"}]},
                {"name": "qwen", "deployments": [{"backend": "ollama-1", "model": "qwen2.5:0.5b"}]},
            ],
        },
        "test",
    )


def test_api_keys_gate_the_api(
    fake_ollama: tuple[FakeOllama, ServerThread], start_gateway: Callable[..., ServerThread]
) -> None:
    fake, server = fake_ollama
    gateway = start_gateway(keyed_config(server.url), {"OPS_KEY": "sk-ops-77"})
    chat = gateway.url + "/v1/chat/completions"
    assert httpx.post(chat, json={"model": "llama3.2", "messages": HELLO}).status_code == 401
    wrong = httpx.post(
        chat, json={"model": "llama3.2", "messages": HELLO}, headers={"authorization": "Bearer nope"}
    )
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "invalid_api_key")
    assert fake.chat_bodies() == []

    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=SECRET, max_retries=0) as clinic:
        reply = clinic.chat.completions.create(model="llama3.2", messages=HELLO)
        assert reply.choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError) as denied:
            clinic.chat.completions.create(model="qwen", messages=HELLO)
        assert denied.value.code == "model_not_allowed"
        assert [m.id for m in clinic.models.list()] == ["llama3.2"]
        response = clinic.chat.completions.with_raw_response.create(model="llama3.2", messages=HELLO)
        assert response.headers["x-phoenix-privacy"] == "private;reason=key"
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-ops-77", max_retries=0) as ops:
        assert ops.chat.completions.create(model="qwen", messages=HELLO).model == "qwen"
        assert {m.id for m in ops.models.list()} == {"llama3.2", "qwen"}
    assert httpx.get(gateway.url + "/v1/models").status_code == 401
    assert httpx.get(gateway.url + "/healthz").status_code == 200  # operations stay open
    assert httpx.get(gateway.url + "/metrics").status_code == 200


def test_a_404_names_only_models_the_key_may_use(
    fake_ollama: tuple[FakeOllama, ServerThread], start_gateway: Callable[..., ServerThread]
) -> None:
    gateway = start_gateway(keyed_config(fake_ollama[1].url), {"OPS_KEY": "sk-ops-77"})

    def message(key: str, method: str, path: str, model: str) -> str:
        body = {"model": model, "messages": HELLO} if method == "POST" else None
        answer = httpx.request(
            method, gateway.url + path, json=body, headers={"authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 404, answer.text
        return str(answer.json()["error"]["message"])

    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models/qwn")):
        # the ops key may use every model; the clinic key only llama*, and is shown no other
        assert message("sk-ops-77", method, path, "qwn").endswith("Did you mean: qwen?")
        assert message(SECRET, method, path, "qwn") == (
            "The model 'qwn' does not exist on this gateway. Known models: llama3.2."
        )
    assert message(SECRET, "GET", "/v1/models/qwen", "") == (
        "The model 'qwen' does not exist on this gateway. Known models: llama3.2."
    )


def test_a_gemini_model_name_cannot_steer_the_upstream_url_past_the_keys_globs(tmp_path: Path) -> None:
    """Under `gemini/*` the name goes into Gemini's URL path. A key allowed only the flash models
    asked for `gemini-2.5-flash/../gemini-2.5-pro`: its glob took the name, and the https client,
    dropping the dot segment, called gemini-2.5-pro. Names Gemini does not have are a 400 now."""
    tls = TlsFiles.issue(tmp_path)
    fake = FakeGemini(models=["gemini-2.5-flash", "gemini-2.5-pro"], api_key="gm-key", thinking=[])
    with serve(fake.app, tls=tls) as upstream:
        config = {
            "backends": [
                {
                    "name": "gemini",
                    "type": "gemini",
                    "base_url": upstream.url + "/v1beta",
                    "api_key_env": "GK",
                }
            ],
            "models": [{"name": "gemini/*", "deployments": [{"backend": "gemini"}]}],
            "auth": {
                "keys": [
                    {
                        "name": "flash",
                        "key_sha256": hashlib.sha256(b"sk-flash").hexdigest(),
                        "models": ["gemini/gemini-2.5-flash*"],
                    }
                ]
            },
        }
        path = tmp_path / "gateway.json"
        path.write_text(json.dumps(config))
        env = {**os.environ, "GK": "gm-key", "SSL_CERT_FILE": tls.ca_bundle}
        with gateway_process(["--config", str(path)], tmp_path / "gateway.log", env) as gateway:

            def ask(model: str, endpoint: str = "chat/completions") -> httpx.Response:
                body = (
                    {"model": model, "input": "x"}
                    if endpoint == "embeddings"
                    else {"model": model, "messages": HELLO}
                )
                return httpx.post(
                    f"{gateway.url}/v1/{endpoint}",
                    json=body,
                    headers={"authorization": "Bearer sk-flash"},
                    timeout=30,
                )

            assert ask("gemini/gemini-2.5-flash").status_code == 200
            assert ask("gemini/gemini-2.5-pro").status_code == 403
            fake.requests.clear()
            for model in (
                "gemini/gemini-2.5-flash/../gemini-2.5-pro",
                "gemini/gemini-2.5-flash%2F..%2Fgemini-2.5-pro",
                "gemini/gemini-2.5-flash:generateContent?alt=json",
                "gemini/gemini-2.5-flash\r",
                "gemini/gemini-2.5-flash\u00e9",
            ):
                for endpoint in ("chat/completions", "embeddings"):
                    refused = ask(model, endpoint)
                    assert refused.status_code == 400, (model, refused.text)
                    error = refused.json()["error"]
                    assert error["param"] == "model"
                    assert "is not a Gemini model name" in error["message"]
            assert [p for p, _, _ in fake.requests if not p.endswith("/models")] == []


def test_the_cli_refuses_to_start_when_a_key_variable_is_unset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPS_KEY", raising=False)
    path = tmp_path / "gateway.yaml"
    path.write_text(
        json.dumps(
            {
                "auth": {"keys": [{"name": "ops", "key_env": "OPS_KEY"}]},
                "backends": [{"name": "ollama-1", "type": "ollama"}],
                "models": [{"name": "llama3.2", "deployments": [{"backend": "ollama-1"}]}],
            }
        )
    )
    assert main(["serve", "--config", str(path), "--port", str(free_port())]) == 1
    assert "$OPS_KEY" in capsys.readouterr().err


# ---- Ollama's cloud models ----


def test_private_traffic_never_reaches_an_ollama_cloud_model(
    start_gateway: Callable[..., ServerThread],
) -> None:
    fake = FakeOllama(models=["llama3.2:latest"], cloud=["gpt-oss:120b-cloud", "house-model:latest"])
    with serve(fake.app) as server:
        gateway = start_gateway(
            parse_config(
                {
                    "backends": [{"name": "ollama-1", "type": "ollama", "base_url": server.url}],
                    "models": [{"name": "*", "deployments": [{"backend": "ollama-1"}]}],
                },
                "test",
            )
        )
        chat = gateway.url + "/v1/chat/completions"
        private = {"x-privacy": "private"}
        for model in ("gpt-oss:120b-cloud", "house-model"):  # by name, and an alias the inventory flags
            refused = httpx.post(chat, json={"model": model, "messages": HELLO}, headers=private)
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["code"] == "privacy_violation"
        assert fake.chat_bodies() == []
        assert (
            httpx.post(chat, json={"model": "llama3.2", "messages": HELLO}, headers=private).status_code
            == 200
        )
        public = httpx.post(chat, json={"model": "house-model", "messages": HELLO})
        assert public.status_code == 200  # public traffic may use them
    assert [body["model"] for body in fake.chat_bodies()] == ["llama3.2", "house-model"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_the_audit_file_says_an_ollama_cloud_alias_is_not_local(
    start_gateway: Callable[..., ServerThread], tmp_path: Path, stream: bool
) -> None:
    fake = FakeOllama(models=["llama3.2:latest"], cloud=["house-model:latest"])  # an alias only Ollama knows
    audit = tmp_path / "audit.jsonl"
    with serve(fake.app) as server:
        gateway = start_gateway(
            parse_config(
                {
                    "backends": [{"name": "ollama-1", "type": "ollama", "base_url": server.url}],
                    "models": [{"name": "*", "deployments": [{"backend": "ollama-1"}]}],
                    "privacy": {"audit_log": str(audit)},
                },
                "test",
            )
        )
        for model in ("house-model", "llama3.2"):
            answer = httpx.post(
                gateway.url + "/v1/chat/completions",
                json={"model": model, "messages": HELLO, "stream": stream},
            )
            assert answer.status_code == 200, answer.text
    wait_for(lambda: audit.read_text().count("\n") == 2)  # each is written just after its answer
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["served_model"], r["local"]) for r in records] == [("house-model", False), ("llama3.2", True)]


# ---- the audit file ----


def test_the_audit_file_proves_where_private_traffic_went(
    fake_ollama: tuple[FakeOllama, ServerThread],
    start_gateway: Callable[..., ServerThread],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, server = fake_ollama
    cloud = FakeOpenAI()
    audit = tmp_path / "audit.jsonl"
    with serve(cloud.app) as cloud_server:
        config = parse_config(
            {
                "backends": [
                    {"name": "ollama-1", "type": "ollama", "base_url": server.url},
                    {"name": "openai", "type": "openai", "base_url": cloud_server.url + "/v1"},
                ],
                "models": [
                    {
                        "name": "chat",
                        "deployments": [{"backend": "openai", "model": "gpt-4o-mini"}],
                        "fallbacks": ["local"],
                    },
                    {"name": "local", "deployments": [{"backend": "ollama-1", "model": "llama3.2"}]},
                ],
                "privacy": {"audit_log": str(audit), "local_model": "local"},
            },
            "test",
        )
        gateway = start_gateway(config)
        chat = gateway.url + "/v1/chat/completions"
        secret = "My card is 4111 1111 1111 1111"
        for content, headers in [("hi", {}), (secret, {}), ("hi", {"x-privacy": "private"}), ("hi", {})]:
            answer = httpx.post(
                chat,
                json={"model": "chat", "messages": [{"role": "user", "content": content}]},
                headers=headers,
            )
            assert answer.status_code == 200
    wait_for(lambda: audit.read_text().count("\n") == 4)  # each is written just after its answer
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["privacy"], r["backend"], r["local"]) for r in records] == [
        ("public", "openai", False),
        ("private", "ollama-1", True),
        ("private", "ollama-1", True),
        ("public", "openai", False),
    ]
    assert records[1]["privacy_reason"] == "pii:card"
    assert "4111" not in audit.read_text()

    assert main(["audit", "verify", str(audit)]) == 0
    report = capsys.readouterr().out
    assert "private requests served by a non-local backend: none" in report

    lines = audit.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["backend"], edited["local"] = "openai", False  # someone hides where it went
    lines[1] = json.dumps(edited, separators=(",", ":"))
    audit.write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", str(audit)]) == 1
    assert "line 3" in capsys.readouterr().out


def test_while_another_process_holds_the_audit_files_lock_the_gateway_keeps_answering(
    fake_ollama: tuple[FakeOllama, ServerThread], start_gateway: Callable[..., ServerThread], tmp_path: Path
) -> None:
    """A backup job's `flock audit.jsonl cp ...` delays the records, not the answers or /healthz."""
    _, server = fake_ollama
    audit = tmp_path / "audit.jsonl"
    config = pool_config(server.url, privacy={"audit_log": str(audit)})
    gateway = start_gateway(config)
    chat = {"model": "llama", "messages": HELLO}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        wait_for(lambda: audit.read_text().count("\n") == 1)  # written just after the answer
        with locked_elsewhere(audit):
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
            assert client.get("/healthz").status_code == 200
            streamed = client.post("/v1/chat/completions", json={**chat, "stream": True})
            assert streamed.status_code == 200
            assert streamed.text.endswith("data: [DONE]\n\n")
            assert len(audit.read_text().splitlines()) == 1  # the two records wait for the lock
    for _ in range(500):
        if len(lines := audit.read_text().splitlines()) == 3:
            break
        time.sleep(0.01)
    assert [json.loads(line)["stream"] for line in lines] == [False, False, True]
    assert main(["audit", "verify", str(audit)]) == 0
