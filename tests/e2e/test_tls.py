"""An https backend, as the cloud APIs are: the gateway's https client (aiohttp's pool) against a
real TLS server on loopback, with a certificate from a CA of the test's own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.fakes.ollama_server import Reply
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import GatewayProcess, TlsFiles, gateway_process, serve

pytestmark = pytest.mark.e2e

KEY = "sk-upstream"


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return TlsFiles.issue(tmp_path)


@pytest.fixture
def fake(tls: TlsFiles) -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI(api_key=KEY)
    with serve(fake.app, tls=tls) as server:
        yield fake, server.url


def _gateway(tmp_path: Path, url: str, ca_bundle: str | None) -> Iterator[GatewayProcess]:
    config = {
        "backends": [{"name": "cloud", "type": "openai", "base_url": url + "/v1", "api_key_env": "KEY"}],
        "models": [{"name": "chat", "deployments": [{"backend": "cloud", "model": "gpt-4o-mini"}]}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env["KEY"] = KEY
    if ca_bundle is not None:
        env["SSL_CERT_FILE"] = ca_bundle
    with gateway_process(["--config", str(path)], tmp_path / "gateway.log", env) as gateway:
        yield gateway


def test_an_https_backend_signed_by_a_ca_named_in_ssl_cert_file_serves_answers_and_streams(
    tmp_path: Path, tls: TlsFiles, fake: tuple[FakeOpenAI, str]
) -> None:
    upstream, url = fake
    upstream.queue(Reply(content="over tls"), Reply(pieces=["o", "v", "er"]))
    for gateway in _gateway(tmp_path, url, tls.ca_bundle):
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="client", max_retries=0) as api:
            answer = api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
            stream = api.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "y"}], stream=True
            )
            pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert answer.choices[0].message.content == "over tls"
    assert pieces == ["o", "v", "er"]
    assert [body["messages"][0]["content"] for body in upstream.chat_bodies()] == ["x", "y"]
    assert {headers["authorization"] for _, _, headers in upstream.requests} == {f"Bearer {KEY}"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_certificate_the_gateway_does_not_trust_is_a_503_that_says_so(
    tmp_path: Path, fake: tuple[FakeOpenAI, str], stream: bool
) -> None:
    upstream, url = fake
    for gateway in _gateway(tmp_path, url, None):
        body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": stream}
        refused = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert refused.status_code == 503
    assert refused.json()["error"] == {
        "message": f"Cannot connect to OpenAI-compatible server at {url}/v1: its TLS certificate is not"
        " trusted (unable to get local issuer certificate). For a certificate of your own CA, set"
        " SSL_CERT_FILE to a bundle that holds it.",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert upstream.requests == []  # the handshake failed: nothing was sent


def test_an_https_url_for_a_plain_http_server_is_a_503_naming_the_failed_handshake(tmp_path: Path) -> None:
    upstream = FakeOpenAI(api_key=KEY)
    with serve(upstream.app) as server:
        for gateway in _gateway(tmp_path, server.url.replace("http://", "https://"), None):
            body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
            refused = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert message.startswith(
        f"Cannot connect to OpenAI-compatible server at https://127.0.0.1:{server.port}/v1"
    )
    assert message.endswith(
        ": the TLS handshake failed (WRONG_VERSION_NUMBER; it may not speak TLS: check the scheme)"
    ), message
