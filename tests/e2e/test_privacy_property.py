"""Property: whatever the request, its tags, the personal data in it and the backends that are failing,
no private request ever reaches a non-local backend. Runs against the real gateway and real HTTP fakes.

The test's own oracle says which requests are private (a tag it set, or personal data it inserted into
text that otherwise cannot contain any), so it does not trust the gateway's classification.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.config import parse_config
from gateway.protocol import GatewayHttpProtocol
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, serve

pytestmark = pytest.mark.e2e
CLINIC, APP = "sk-clinic-prop", "sk-app-prop"
PERSONAL = [  # one valid value of each kind the detector knows
    "ana.lopez@example.org",
    "+34 612 34 56 78",
    "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00",
    "SSN 536-22-8726",
    "CUIT 20-12345678-6",
    "DNI 30.123.456",
    "12345678Z",
    "X1234567L",
    "MRN: 00482913",
]
MODELS = ["chat", "chat-strict", "gpt", "local"]  # mixed, mixed with a private policy, cloud only, local only


@dataclass
class Rig:
    ollama: FakeOllama
    openai: FakeOpenAI
    gemini: FakeGemini
    gateway: ServerThread

    def cloud_calls(self) -> int:
        listings = ("/v1/models", "/v1beta/models")
        return sum(1 for path, *_ in [*self.openai.requests, *self.gemini.requests] if path not in listings)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    ollama, cloud_openai, cloud_gemini = (
        FakeOllama(models=["nomic-embed-text"]),
        FakeOpenAI(),
        FakeGemini(api_key="gm-key"),
    )
    with serve(ollama.app) as local, serve(cloud_openai.app) as o, serve(cloud_gemini.app) as g:
        cloud = [
            {"backend": "openai", "model": "gpt-4o-mini"},
            {"backend": "gemini", "model": "gemini-2.5-flash"},
        ]
        config = parse_config(
            {
                "auth": {
                    "keys": [
                        {
                            "name": "clinic",
                            "key_sha256": hashlib.sha256(CLINIC.encode()).hexdigest(),
                            "privacy": "private",
                        },
                        {"name": "app", "key_sha256": hashlib.sha256(APP.encode()).hexdigest()},
                    ]
                },
                "backends": [
                    {"name": "ollama-1", "type": "ollama", "base_url": local.url},
                    {"name": "openai", "type": "openai", "base_url": o.url + "/v1"},
                    {"name": "gemini", "type": "gemini", "base_url": g.url + "/v1beta", "api_key_env": "GK"},
                ],
                "models": [
                    {
                        "name": "chat",
                        "deployments": [*cloud, {"backend": "ollama-1", "model": "nomic-embed-text"}],
                        "fallbacks": ["gpt"],
                    },
                    {
                        "name": "chat-strict",
                        "deployments": [*cloud, {"backend": "ollama-1", "model": "nomic-embed-text"}],
                        "privacy": "private",
                    },
                    {"name": "gpt", "deployments": cloud, "fallbacks": ["local"]},
                    {
                        "name": "local",
                        "deployments": [{"backend": "ollama-1", "model": "nomic-embed-text"}],
                        "fallbacks": ["gpt"],
                    },
                ],
            },
            "test",
        )
        gateway = ServerThread(create_app(config, environ={"GK": "gm-key"}), http=GatewayHttpProtocol).start()
        try:
            yield Rig(ollama, cloud_openai, cloud_gemini, gateway)
        finally:
            gateway.stop()


def outage(down: bool) -> Reply:
    return Reply(status=503, error_text="overloaded") if down else Reply()


@dataclass
class Case:
    model: str
    header: str | None
    metadata: str | None
    key: str
    personal: str | None
    words: list[str]
    where: int
    down: tuple[bool, bool, bool]  # ollama-1, openai, gemini answer 503
    stream: bool
    endpoint: str


CASES = st.builds(
    Case,
    model=st.sampled_from(MODELS),
    header=st.sampled_from([None, "private", "public", "PRIVATE"]),
    metadata=st.sampled_from([None, "private", "public"]),
    key=st.sampled_from([CLINIC, APP]),
    personal=st.none() | st.sampled_from(PERSONAL),
    words=st.lists(st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=12), min_size=1, max_size=6),
    where=st.integers(min_value=0, max_value=5),
    down=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    stream=st.booleans(),
    endpoint=st.sampled_from(["chat/completions", "embeddings"]),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=CASES)
def test_no_private_request_ever_reaches_a_cloud_backend(rig: Rig, case: Case) -> None:
    rig.ollama.default, rig.openai.default, rig.gemini.default = (outage(down) for down in case.down)
    texts = list(case.words)
    if case.personal is not None:
        texts.insert(min(case.where, len(texts)), f"note: {case.personal}.")
    headers = {"authorization": f"Bearer {case.key}"}
    if case.header is not None:
        headers["x-privacy"] = case.header
    body: dict[str, Any] = {"model": case.model}
    if case.metadata is not None:
        body["metadata"] = {"privacy": case.metadata}
    if case.endpoint == "embeddings":
        body["input"] = texts
    else:
        body.update(messages=[{"role": "user", "content": text} for text in texts], stream=case.stream)
    private = (
        case.header in ("private", "PRIVATE")
        or case.metadata == "private"
        or case.key == CLINIC
        or case.model == "chat-strict"
        or case.personal is not None
    )

    before = rig.cloud_calls()
    answer = httpx.post(f"{rig.gateway.url}/v1/{case.endpoint}", json=body, headers=headers, timeout=10)
    if private:
        assert rig.cloud_calls() == before, "a private request reached a cloud backend"
        assert answer.headers["x-phoenix-privacy"].startswith("private;reason=")
        assert answer.headers.get("x-phoenix-backend") in (None, "ollama-1")
        assert answer.status_code in (200, 403, 502, 503), answer.text
    else:
        assert answer.headers["x-phoenix-privacy"] == "public"
        assert answer.status_code in (200, 502, 503), answer.text
