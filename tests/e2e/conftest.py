"""Real servers on loopback: fake backends and the gateway itself under uvicorn."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.config import Config, parse_config
from gateway.protocol import GatewayHttpProtocol
from tests.engines import MODELS, RealOllama
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.ollama_server import FakeOllama
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, serve


@pytest.fixture
def fake_ollama() -> Iterator[tuple[FakeOllama, ServerThread]]:
    fake = FakeOllama(models=["llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest"])
    with serve(fake.app) as server:
        yield fake, server


@pytest.fixture(scope="session")
def real_ollamas() -> Iterator[Callable[[int], list[RealOllama]]]:
    """`real_ollamas(n)`: n real Ollama servers with every test model registered, started on first
    use and shared by the whole session. Tests must leave them running (stop only what they start)."""
    started: list[RealOllama] = []

    def get(count: int) -> list[RealOllama]:
        while len(started) < count:
            ollama = RealOllama()
            started.append(ollama)
            for name in MODELS:
                ollama.ensure_model(name)
        return started[:count]

    try:
        yield get
    finally:
        for ollama in started:
            ollama.stop()


@pytest.fixture(scope="session")
def real_ollama(real_ollamas: Callable[[int], list[RealOllama]]) -> RealOllama:
    return real_ollamas(1)[0]


def ollama_config(url: str, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "backends": [{"name": "ollama-1", "type": "ollama", "base_url": url}],
        "models": [
            {
                "name": "llama3.2",
                "aliases": ["default"],
                "deployments": [{"backend": "ollama-1", "model": "llama3.2:latest"}],
            },
            {"name": "embed", "deployments": [{"backend": "ollama-1", "model": "nomic-embed-text"}]},
            {"name": "ollama/*", "deployments": [{"backend": "ollama-1"}]},
        ],
    }
    data.update(overrides)
    return parse_config(data, "test")


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(config: Config, environ: dict[str, str] | None = None) -> ServerThread:
        server = ServerThread(create_app(config, environ=environ or {}), http=GatewayHttpProtocol).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def gateway(
    fake_ollama: tuple[FakeOllama, ServerThread], start_gateway: Callable[[Config], ServerThread]
) -> ServerThread:
    return start_gateway(ollama_config(fake_ollama[1].url))


def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll until `condition()` is truthy or the time is up; the caller asserts afterwards."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    text = httpx.get(url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class StreamInBackground:
    """A streamed chat read in a thread, so a test can act on the gateway while it is in flight:
    `started` is set at the first data event; `events` holds every `data:` payload."""

    def __init__(self, url: str, body: dict[str, Any], timeout: float = 20) -> None:
        self.events: list[str] = []
        self.backend = ""
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, {**body, "stream": True}, timeout))
        self._thread.start()

    def _read(self, url: str, body: dict[str, Any], timeout: float) -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as response:
            self.backend = response.headers.get("x-phoenix-backend", "")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line.removeprefix("data: "))
                    self.started.set()

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        """The content of every chunk before the final `[DONE]` or error event."""
        chunks = [json.loads(event) for event in self.events[:-1]]
        return "".join((c["choices"] or [{}])[0].get("delta", {}).get("content") or "" for c in chunks)


KEY = "sk-test-0123456789"  # what the fake OpenAI and Gemini backends take


@dataclass
class Rig:
    kind: str
    fake: FakeOllama | FakeOpenAI | FakeGemini
    gateway: ServerThread
    api: openai.OpenAI
    audit: Path

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def upstream_bodies(self) -> list[dict[str, Any]]:
        return self.fake.chat_bodies()


def rig_config(kind: str, url: str, audit: Path | None = None, **extra: Any) -> Config:
    """`extra`: more of the backend's settings."""
    backend: dict[str, Any]
    if kind == "ollama":
        backend = {"name": "b", "type": "ollama", "base_url": url}
        chat, embed = "llama3.2:latest", "nomic-embed-text:latest"
    elif kind == "openai":
        backend = {
            "name": "b",
            "type": "openai",
            "base_url": url + "/v1",
            "api_key_env": "FAKE_KEY",
            "local": True,
        }
        chat, embed = "gpt-4o-mini", "text-embedding-3-small"
    else:
        backend = {"name": "b", "type": "gemini", "base_url": url + "/v1beta", "api_key_env": "FAKE_KEY"}
        chat, embed = "gemini-2.5-flash", "gemini-embedding-001"
    backend.update(extra)
    models = [
        {"name": "chat", "deployments": [{"backend": "b", "model": chat}]},
        {"name": "embed", "deployments": [{"backend": "b", "model": embed}]},
    ]
    privacy = {"audit_log": str(audit)} if audit else {}
    return parse_config({"backends": [backend], "models": models, "privacy": privacy}, "test")


def rig_fake(kind: str) -> FakeOllama | FakeOpenAI | FakeGemini:
    if kind == "ollama":
        return FakeOllama(models=["llama3.2", "nomic-embed-text"])
    return FakeOpenAI(api_key=KEY) if kind == "openai" else FakeGemini(api_key=KEY)


# Every backend kind, each behind a gateway with an audit file; the official SDK as the client.
@pytest.fixture(params=["ollama", "openai", "gemini"])
def rig(
    request: pytest.FixtureRequest, start_gateway: Callable[..., ServerThread], tmp_path: Path
) -> Iterator[Rig]:
    kind = request.param
    fake = rig_fake(kind)
    audit = tmp_path / "audit.jsonl"
    with serve(fake.app) as upstream:
        gateway = start_gateway(rig_config(kind, upstream.url, audit), environ={"FAKE_KEY": KEY})
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="client", max_retries=0) as api:
            yield Rig(kind, fake, gateway, api, audit)
