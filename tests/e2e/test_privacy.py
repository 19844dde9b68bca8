"""The privacy guarantee, end to end: every way a request becomes private, under every state of the
local backend, against real HTTP fakes of Ollama (local), OpenAI and Gemini (cloud). Whatever
happens, the cloud servers never see a private request."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config import parse_config
from tests.e2e.conftest import sample, scrape, wait_for
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, free_port, serve

pytestmark = pytest.mark.e2e
APP_KEY, CLINIC_KEY = "sk-app-0123456789", "sk-clinic-0123456789"
ENVIRON = {"OPENAI_KEY": "sk-upstream", "GEMINI_KEY": "gm-upstream"}
CLOUD = [{"backend": "openai", "model": "gpt-4o-mini"}, {"backend": "gemini", "model": "gemini-2.5-flash"}]
LOCAL = [{"backend": "ollama-1", "model": "llama3.2:latest"}]
SCENARIOS = ("local up", "local down", "local slow", "cloud-only model", "cloud-only model, local_model set")
SOURCES = ("header", "metadata", "key", "model", "attachment", "pii:email", "pii:card")
PIXEL = (  # one transparent pixel
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5Erk"
    "Jggg=="
)


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def config(ollama_url: str, openai_url: str, gemini_url: str, *, slow: bool, local_model: bool) -> Any:
    timeouts = {"first_token": 0.4, "total": 0.4} if slow else {}
    return parse_config(
        {
            "auth": {
                "keys": [
                    {"name": "app", "key_sha256": sha256(APP_KEY)},
                    {"name": "clinic", "key_sha256": sha256(CLINIC_KEY), "privacy": "private"},
                ]
            },
            "backends": [
                {"name": "ollama-1", "type": "ollama", "base_url": ollama_url, "timeouts": timeouts},
                {"name": "openai", "type": "openai", "base_url": openai_url, "api_key_env": "OPENAI_KEY"},
                {"name": "gemini", "type": "gemini", "base_url": gemini_url, "api_key_env": "GEMINI_KEY"},
                {"name": "gone", "type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
            ],
            "models": [
                {"name": "chat", "deployments": CLOUD + LOCAL},
                {"name": "chat-strict", "deployments": CLOUD + LOCAL, "privacy": "private"},
                {"name": "gpt", "deployments": CLOUD},
                {"name": "gpt-strict", "deployments": CLOUD, "privacy": "private"},
                {"name": "chat-local", "deployments": LOCAL},
                # public models whose one backend is down, falling back to a model kept private
                {
                    "name": "flaky",
                    "deployments": [{"backend": "gone", "model": "m"}],
                    "fallbacks": ["chat-strict"],
                },
                {
                    "name": "flaky-2",
                    "deployments": [{"backend": "gone", "model": "m"}],
                    "fallbacks": ["gpt-strict"],
                },
                {
                    "name": "embed-cloud",
                    "deployments": [{"backend": "openai", "model": "text-embedding-3-small"}],
                },
                {
                    "name": "embed",
                    "deployments": [
                        {"backend": "openai", "model": "text-embedding-3-small"},
                        {"backend": "ollama-1", "model": "nomic-embed-text"},
                    ],
                },
            ],
            # an image the PII detector cannot read makes a request private
            "privacy": {"attachments": "private", **({"local_model": "chat-local"} if local_model else {})},
        },
        "test",
    )


@dataclass
class Rig:
    ollama: FakeOllama
    openai: FakeOpenAI
    gemini: FakeGemini
    gateways: dict[str, ServerThread]

    def chat(self, body: dict[str, object], **headers: str) -> httpx.Response:
        """A chat request to the gateway whose local backend is up, with the app's key."""
        return httpx.post(
            self.gateways["local up"].url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {APP_KEY}", **headers},
            timeout=10,
        )

    def cloud_calls(self) -> int:
        """Requests the cloud fakes received, other than model listings."""
        listings = ("/v1/models", "/v1beta/models")
        return sum(1 for path, *_ in [*self.openai.requests, *self.gemini.requests] if path not in listings)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    ollama, slow_ollama = FakeOllama(models=["llama3.2", "nomic-embed-text"]), FakeOllama()
    slow_ollama.default = Reply(delay_first=2.0)
    cloud_openai, cloud_gemini = FakeOpenAI(api_key="sk-upstream"), FakeGemini(api_key="gm-upstream")
    with (
        serve(ollama.app) as local,
        serve(slow_ollama.app) as slow,
        serve(cloud_openai.app) as openai_server,
        serve(cloud_gemini.app) as gemini_server,
    ):
        urls = {
            "local up": local.url,
            "local down": f"http://127.0.0.1:{free_port()}",
            "local slow": slow.url,
            "cloud-only model": local.url,
            "cloud-only model, local_model set": local.url,
        }
        gateways = {
            scenario: ServerThread(
                create_app(
                    config(
                        url,
                        openai_server.url + "/v1",
                        gemini_server.url + "/v1beta",
                        slow=scenario == "local slow",
                        local_model=scenario.endswith("local_model set"),
                    ),
                    environ=ENVIRON,
                )
            ).start()
            for scenario, url in urls.items()
        }
        try:
            yield Rig(ollama, cloud_openai, cloud_gemini, gateways)
        finally:
            for gateway in gateways.values():
                gateway.stop()


def request_for(source: str, scenario: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A chat request made private by `source`, for the model the scenario needs."""
    model = "gpt" if scenario.startswith("cloud-only") else "chat"
    text = "Summarise the visit notes."
    headers = {"authorization": f"Bearer {CLINIC_KEY if source == 'key' else APP_KEY}"}
    body: dict[str, Any] = {"model": model, "max_tokens": 5}
    if source == "header":
        headers["x-privacy"] = "private"
    elif source == "metadata":
        body["metadata"] = {"privacy": "private"}
    elif source == "model":
        body["model"] = model + "-strict"
    elif source == "pii:email":
        text += " Reply to ana.lopez@example.org when done."
    elif source == "pii:card":
        text += " Mi tarjeta es 4111 1111 1111 1111, vence 09/27."
    content: Any = text
    if source == "attachment":
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": PIXEL}}]
    body["messages"] = [{"role": "user", "content": content}]
    return body, headers


EXPECTED = {  # scenario -> (status, backend, model in the answer) for a private request
    "local up": (200, "ollama-1", None),
    "local down": (503, None, None),
    "local slow": (504, "ollama-1", None),  # it was tried, and timed out
    "cloud-only model": (403, None, None),
    "cloud-only model, local_model set": (200, "ollama-1", "chat-local"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_private_request_never_reaches_the_cloud(
    rig: Rig, scenario: str, source: str, stream: bool
) -> None:
    gateway = rig.gateways[scenario]
    body, headers = request_for(source, scenario)
    before = rig.cloud_calls()
    answer = httpx.post(
        gateway.url + "/v1/chat/completions", json={**body, "stream": stream}, headers=headers, timeout=10
    )
    status, backend, model = EXPECTED[scenario]
    assert rig.cloud_calls() == before, "a cloud backend received a private request"
    assert answer.status_code == status, answer.text
    assert answer.headers["x-phoenix-privacy"] == f"private;reason={source}"
    assert answer.headers.get("x-phoenix-backend") == backend
    if status == 200 and not stream:
        assert answer.json()["model"] == (model or body["model"])
    if status == 200 and stream:
        assert answer.text.rstrip().endswith("data: [DONE]")
        assert f'"model":"{model or body["model"]}"' in answer.text
    if status == 403:
        assert answer.json()["error"]["code"] == "privacy_violation"
        assert "never sent to a cloud backend" in answer.json()["error"]["message"]
    if status == 503:
        assert "ollama-1" in answer.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_text_completion_with_personal_data_never_reaches_the_cloud(
    rig: Rig, scenario: str, stream: bool
) -> None:
    # One prompt of two holds an e-mail address: the whole request is private, every prompt local.
    model = "gpt" if scenario.startswith("cloud-only") else "chat"
    prompts = ["Summarise the visit notes.", "Reply to ana.lopez@example.org when done."]
    before = rig.cloud_calls()
    answer = httpx.post(
        rig.gateways[scenario].url + "/v1/completions",
        json={"model": model, "prompt": prompts, "max_tokens": 5, "stream": stream},
        headers={"authorization": f"Bearer {APP_KEY}"},
        timeout=10,
    )
    status, backend, substitute = EXPECTED[scenario]
    assert rig.cloud_calls() == before, "a cloud backend received a private request"
    assert answer.status_code == status, answer.text
    assert answer.headers["x-phoenix-privacy"] == "private;reason=pii:email"
    assert answer.headers.get("x-phoenix-backend") == backend
    if status == 200:
        assert f'"model":"{substitute or model}"' in answer.text.replace(" ", "")
        assert '"object":"text_completion"' in answer.text.replace(" ", "")
    if status == 403:
        assert answer.json()["error"]["code"] == "privacy_violation"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_public_requests_may_use_the_cloud(rig: Rig, scenario: str) -> None:
    body, headers = request_for("none", scenario)
    url = rig.gateways[scenario].url + "/v1/chat/completions"
    answer = httpx.post(url, json=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-phoenix-privacy"] == "public"
    if scenario != "local up":  # the local instance is down, slow, or not a deployment of the model
        assert answer.headers["x-phoenix-backend"] in ("openai", "gemini")


def test_privacy_decisions_are_counted(rig: Rig) -> None:
    gateway = rig.gateways["local up"]
    for source in ("header", "pii:email", "none"):
        body, headers = request_for(source, "local up")
        assert httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers).status_code == 200
    samples = scrape(gateway.url)
    for privacy, reason in (("private", "header"), ("private", "pii:email"), ("public", "default")):
        assert sample(samples, "gateway_privacy_decisions_total", privacy=privacy, reason=reason) >= 1


def test_embeddings_with_personal_data_stay_local(rig: Rig) -> None:
    gateway = rig.gateways["local up"]
    before = rig.cloud_calls()
    answer = httpx.post(
        gateway.url + "/v1/embeddings",
        json={"model": "embed", "input": ["call me on +34 612 34 56 78", "fine"]},
        headers={"authorization": f"Bearer {APP_KEY}"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-phoenix-privacy"] == "private;reason=pii:phone"
    assert answer.headers["x-phoenix-backend"] == "ollama-1"
    assert rig.cloud_calls() == before


def test_local_model_serves_no_private_embeddings(rig: Rig) -> None:
    # `chat-local`, the local_model, is a chat model: it has no embeddings for `embed-cloud`.
    gateway = rig.gateways["cloud-only model, local_model set"]
    before, embeds = rig.cloud_calls(), len([p for p, *_ in rig.ollama.requests if p == "/api/embed"])
    answer = httpx.post(
        gateway.url + "/v1/embeddings",
        json={"model": "embed-cloud", "input": f"write to {EMAIL}"},
        headers={"authorization": f"Bearer {APP_KEY}"},
    )
    assert answer.status_code == 403, answer.text
    assert answer.headers["x-phoenix-privacy"] == "private;reason=pii:email"
    assert "x-phoenix-backend" not in answer.headers
    error = answer.json()["error"]
    assert error["code"] == "privacy_violation"
    assert "'embed-cloud' has no local deployment" in error["message"]
    assert rig.cloud_calls() == before
    assert len([p for p, *_ in rig.ollama.requests if p == "/api/embed"]) == embeds


@pytest.mark.parametrize("ids", [[5, 6, 7], [[5, 6, 7], [8]]], ids=["one", "several"])
def test_token_ids_the_detector_cannot_read_never_reach_the_cloud(rig: Rig, ids: list[Any]) -> None:
    before = rig.cloud_calls()
    answer = httpx.post(
        rig.gateways["local up"].url + "/v1/embeddings",
        json={"model": "embed-cloud", "input": ids},
        headers={"authorization": f"Bearer {APP_KEY}"},
    )
    assert answer.status_code == 403, answer.text
    assert answer.headers["x-phoenix-privacy"] == "private;reason=token_ids"
    error = answer.json()["error"]
    assert error["code"] == "privacy_violation"
    assert "token ids" in error["message"] and "as text" in error["message"]
    assert rig.cloud_calls() == before


EMAIL = "ana.lopez@example.org"
TOOL: dict[str, Any] = {"type": "function", "function": {"name": "notify", "parameters": {"type": "object"}}}
# Personal data outside the messages' text, in fields an OpenAI-compatible backend would receive.
ELSEWHERE: dict[str, dict[str, object]] = {
    "user": {"user": EMAIL},
    "safety_identifier": {"safety_identifier": EMAIL},
    "metadata": {"metadata": {"patient": EMAIL}},
    "message name": {"messages": [{"role": "user", "name": EMAIL, "content": "Summarise the notes."}]},
    "prediction": {"prediction": {"type": "content", "content": f"Dear Ms Lopez ({EMAIL}),"}},
    "stop": {"stop": [EMAIL]},
    "tool description": {"tools": [{**TOOL, "function": {**TOOL["function"], "description": EMAIL}}]},
    "response_format": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "letter", "schema": {"type": "object", "description": f"to {EMAIL}"}},
        }
    },
    "unknown message field": {
        "messages": [{"role": "user", "content": "Go on.", "reasoning_content": f"write to {EMAIL}"}]
    },
    # the names of an object's members go upstream too
    "metadata key": {"metadata": {EMAIL: "reviewer"}, "store": True},
    "schema property name": {
        "tools": [{**TOOL, "function": {**TOOL["function"], "parameters": {"properties": {EMAIL: {}}}}}]
    },
    # shaped like an attachment, but no content part: text an OpenAI-compatible backend gets as it is
    "audio-shaped unknown field": {"context": {"input_audio": {"data": f"write to {EMAIL}"}}},
    "image-shaped unknown field": {"context": {"image_url": f"data:,write to {EMAIL}"}},
}


@pytest.mark.parametrize("where", ELSEWHERE)
def test_personal_data_anywhere_in_the_body_keeps_it_local(rig: Rig, where: str) -> None:
    body: dict[str, object] = {
        "model": "chat",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "Summarise the notes."}],
    }
    body.update(ELSEWHERE[where])
    before = rig.cloud_calls()
    answer = rig.chat(body)
    assert rig.cloud_calls() == before, "a cloud backend received personal data"
    assert answer.headers["x-phoenix-privacy"] == "private;reason=pii:email", answer.text
    assert answer.headers.get("x-phoenix-backend") == "ollama-1"


def test_a_card_number_sent_as_a_json_number_keeps_the_request_local(rig: Rig) -> None:
    """An unknown field reaches an OpenAI-compatible backend as it is, numbers included."""
    body = {
        "model": "chat",
        "max_tokens": 5,
        "seed": 1234567890,  # a large number that is no card stays public
        "messages": [{"role": "user", "content": "Charge the customer."}],
    }
    public = rig.chat(body)
    assert public.headers["x-phoenix-privacy"] == "public", public.text
    before = rig.cloud_calls()
    answer = rig.chat({**body, "customer": {"card": 4111111111111111}})
    assert rig.cloud_calls() == before, "a cloud backend received the card number"
    assert answer.headers["x-phoenix-privacy"] == "private;reason=pii:card", answer.text


@pytest.mark.parametrize(
    "result",
    [{"nombre": "Ana López", "teléfono": "612 34 56 78"}, {"card": "4111\u00a01111\u00a01111\u00a01111"}],
    ids=["accented-label", "nbsp-card"],
)
def test_personal_data_in_a_tool_result_written_by_json_dumps_keeps_it_local(
    rig: Rig, result: dict[str, str]
) -> None:
    # Python's json.dumps writes what is past ASCII as \uXXXX escapes, which the backend's model reads
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    body = {
        "model": "chat",
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "Who is the customer?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result)},
        ],
    }
    before = rig.cloud_calls()
    answer = rig.chat(body)
    assert rig.cloud_calls() == before, "a cloud backend received personal data"
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-phoenix-privacy"].startswith("private;reason=pii:")
    assert answer.headers["x-phoenix-backend"] == "ollama-1"


def test_an_embedding_request_s_user_is_read_for_personal_data(rig: Rig) -> None:
    before = rig.cloud_calls()
    answer = httpx.post(
        rig.gateways["local up"].url + "/v1/embeddings",
        json={"model": "embed", "input": "fine", "user": EMAIL},
        headers={"authorization": f"Bearer {APP_KEY}"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-phoenix-privacy"] == "private;reason=pii:email"
    assert rig.cloud_calls() == before


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_private_model_lends_a_public_request_only_its_local_deployments(rig: Rig, stream: bool) -> None:
    # `flaky` fails over to `chat-strict`, whose policy is private: every request for it stays local.
    before = rig.cloud_calls()
    answer = rig.chat({"model": "flaky", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-phoenix-backend"] == "ollama-1"
    assert rig.cloud_calls() == before


def test_a_private_model_without_a_local_deployment_is_no_fallback(rig: Rig) -> None:
    before = rig.cloud_calls()
    answer = rig.chat({"model": "flaky-2", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 503, answer.text  # the primary's own failure
    assert answer.json()["error"]["message"].startswith("Cannot connect")
    assert rig.cloud_calls() == before


@pytest.mark.parametrize(
    ("header", "body_extra", "param"),
    [
        ({"x-privacy": "secret"}, {}, "x-privacy"),
        ({}, {"metadata": {"privacy": "confidential"}}, "metadata.privacy"),
    ],
)
def test_a_privacy_tag_that_is_neither_value_is_refused(
    rig: Rig, header: dict[str, str], body_extra: dict[str, Any], param: str
) -> None:
    before = rig.cloud_calls()
    answer = httpx.post(
        rig.gateways["local up"].url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], **body_extra},
        headers={"authorization": f"Bearer {APP_KEY}", **header},
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param
    assert rig.cloud_calls() == before


@pytest.mark.parametrize(
    "lines",
    [["public", "private"], ["private", "public"], ["public, private"]],
    ids=["last", "first", "joined"],
)
def test_a_privacy_header_sent_twice_is_private_if_either_says_so(rig: Rig, lines: list[str]) -> None:
    # An app's own tag and a proxy's, one after the other: neither may undo the other's private.
    body, _ = request_for("none", "cloud-only model")
    headers = [("authorization", f"Bearer {APP_KEY}"), *(("x-privacy", line) for line in lines)]
    before = rig.cloud_calls()
    answer = httpx.post(
        rig.gateways["cloud-only model"].url + "/v1/chat/completions", json=body, headers=headers
    )
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["code"] == "privacy_violation"
    assert rig.cloud_calls() == before


@contextmanager
def pool_gateway(ollamas: list[FakeOllama], cloud: FakeOpenAI | None = None) -> Iterator[str]:
    """A gateway whose model `chat` has two local instances, `ollamas` (ollama-a, ollama-b), and
    `cloud` first when given: its URL while it serves."""
    with ExitStack() as stack:
        urls = [stack.enter_context(serve(fake.app)).url for fake in ollamas]
        backends: list[dict[str, Any]] = [
            {"name": f"ollama-{name}", "type": "ollama", "base_url": url}
            for name, url in zip("ab", urls, strict=True)
        ]
        deployments = [{"backend": f"ollama-{name}", "model": "llama3.2"} for name in "ab"]
        if cloud is not None:
            cloud_url = stack.enter_context(serve(cloud.app)).url + "/v1"
            backends.append({"name": "openai", "type": "openai", "base_url": cloud_url, "api_key_env": "K"})
            deployments.insert(0, {"backend": "openai", "model": "gpt-4o-mini"})
        settings = parse_config(
            {"backends": backends, "models": [{"name": "chat", "deployments": deployments}]}, "test"
        )
        gateway = ServerThread(create_app(settings, environ={"K": "sk-upstream"})).start()
        stack.callback(gateway.stop)
        yield gateway.url


def private_chat(url: str, stream: bool = False) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-privacy": "private"},
        timeout=10,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_private_request_whose_local_backends_all_fail_says_it_failed_closed(stream: bool) -> None:
    broken = FakeOllama(models=["llama3.2"])
    broken.default = Reply(status=500, error_text="model runner has unexpectedly stopped")
    cloud = FakeOpenAI(api_key="sk-upstream")
    with pool_gateway([broken, broken], cloud) as url:
        answer = private_chat(url, stream)
    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith("No local backend could serve this private request (reason: header)")
    assert "ollama-a" in message and "ollama-b" in message and "model runner" in message
    assert "never sent to a cloud backend" in message
    assert [path for path, *_ in cloud.requests if path != "/v1/models"] == []


def test_a_private_request_for_a_model_every_local_instance_lost_gets_ollamas_404() -> None:
    fakes = [FakeOllama(models=["llama3.2"]) for _ in range(2)]
    with pool_gateway(fakes) as url:
        wait_for(lambda: all(any(path == "/api/tags" for path, _ in f.requests) for f in fakes))
        for fake in fakes:
            fake.models = []  # `ollama rm` on both, after the gateway read their lists
        answer = private_chat(url)
    assert answer.status_code == 404, answer.text
    assert "ollama pull llama3.2" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("headers", "body", "status", "recorded"),
    [
        ({"x-privacy": "private"}, {"model": "no-such-model"}, 404, "private;reason=header"),
        ({"x-privacy": "private, x"}, {}, 400, "private;reason=header"),  # the tag itself is refused
        ({"x-privacy": "private", "authorization": "Bearer sk-wrong"}, {}, 401, "private;reason=header"),
        ({"authorization": f"Bearer {CLINIC_KEY}"}, {"messages": []}, 400, "private;reason=key"),
        ({"authorization": f"Bearer {CLINIC_KEY}"}, {"model": "no-such-model"}, 404, "private;reason=key"),
        ({}, {"model": "no-such-model"}, 404, "public"),
    ],
)
def test_a_request_refused_before_its_privacy_is_decided_keeps_the_privacy_it_stated(
    rig: Rig, headers: dict[str, str], body: dict[str, Any], status: int, recorded: str
) -> None:
    answer = httpx.post(
        rig.gateways["local up"].url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], **body},
        headers={"authorization": f"Bearer {APP_KEY}", **headers},
    )
    assert answer.status_code == status, answer.text
    assert answer.headers["x-phoenix-privacy"] == recorded


def test_an_address_percent_encoded_in_an_image_url_keeps_the_request_local() -> None:
    # urlencode writes the '@' of an address in a query as %40; the cloud backend would get the URL
    cloud = FakeOpenAI(api_key="sk-upstream")
    url = "https://img.example/scan.png?owner=ana.lopez%40example.org"
    content = [{"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": {"url": url}}]
    with pool_gateway([FakeOllama(), FakeOllama()], cloud) as gateway:
        answer = httpx.post(
            gateway + "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": content}]},
            timeout=10,
        )
    assert answer.headers["x-phoenix-privacy"] == "private;reason=pii:email", answer.text
    assert [path for path, *_ in cloud.requests if path != "/v1/models"] == []
