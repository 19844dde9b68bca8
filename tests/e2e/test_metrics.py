"""What /metrics shows after known traffic: label values bounded by the config, and exact counts on
the embeddings, privacy and streaming paths (read back through prometheus_client's parser)."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import sample, scrape
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.servers import ServerThread

pytestmark = pytest.mark.e2e
HI = [{"role": "user", "content": "hi"}]


def post(gateway: ServerThread, path: str, body: dict[str, object], **headers: str) -> httpx.Response:
    return httpx.post(gateway.url + path, json=body, headers=headers, timeout=10)


def test_a_flood_of_made_up_model_names_creates_no_series(gateway: ServerThread) -> None:
    post(gateway, "/v1/chat/completions", {"model": "no-such-model", "messages": HI})
    post(gateway, "/v1/chat/completions", {"model": "ollama/no-such-model", "messages": HI})
    post(gateway, "/v1/embeddings", {"model": "ollama/no-such-model", "input": "x"})
    before = set(scrape(gateway.url))
    for i in range(60):
        post(gateway, "/v1/chat/completions", {"model": f"invented-{i}", "messages": HI})
        post(gateway, "/v1/chat/completions", {"model": f"ollama/invented-{i}", "messages": HI})
        post(gateway, "/v1/embeddings", {"model": f"ollama/invented-{i}", "input": "x"})
    after = scrape(gateway.url)
    new = set(after) - before
    labels = {
        value for _, pairs in after for name, value in pairs if name in ("model", "from_model", "to_model")
    }
    assert not any(value.startswith(("invented", "ollama/invented")) for value in labels)
    assert not new, new
    assert sample(after, "gateway_requests_total", endpoint="chat", model="", backend="", status="404") == 61


def test_embeddings_privacy_and_streams_are_counted_exactly(
    fake_ollama: tuple[FakeOllama, ServerThread], gateway: ServerThread
) -> None:
    fake, _ = fake_ollama
    fake.queue(Reply(pieces=["a", "b", "c"], prompt_eval_count=7, eval_count=3))
    stream = {"model": "llama3.2", "messages": HI, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=stream, timeout=10) as response:
        assert response.status_code == 200
        assert list(response.iter_lines())[-2] == "data: [DONE]"
    assert post(gateway, "/v1/embeddings", {"model": "embed", "input": ["one", "two"]}).status_code == 200
    private = post(
        gateway, "/v1/chat/completions", {"model": "llama3.2", "messages": HI}, **{"x-privacy": "private"}
    )
    assert private.status_code == 200
    pii = [{"role": "user", "content": "write to ana.garcia@example.org please"}]
    assert post(gateway, "/v1/chat/completions", {"model": "llama3.2", "messages": pii}).status_code == 200

    samples = scrape(gateway.url)
    chat = {"endpoint": "chat", "model": "llama3.2", "backend": "ollama-1"}
    assert sample(samples, "gateway_requests_total", **chat, status="200") == 3
    assert sample(samples, "gateway_requests_total", endpoint="embeddings", model="embed",
                  backend="ollama-1", status="200") == 1  # fmt: skip
    completion = 3 + 2 + 2  # the stream's 3, then the default reply's "Hello there!" twice
    assert sample(
        samples, "gateway_tokens_total", model="llama3.2", backend="ollama-1", type="completion"
    ) == (completion)
    assert (
        sample(samples, "gateway_time_to_first_token_seconds_count", model="llama3.2", backend="ollama-1")
        == 1
    )
    assert sample(samples, "gateway_request_duration_seconds_count", **chat, stream="true") == 1
    assert sample(samples, "gateway_request_duration_seconds_count", **chat, stream="false") == 2
    assert sample(samples, "gateway_privacy_decisions_total", privacy="public", reason="default") == 2
    assert sample(samples, "gateway_privacy_decisions_total", privacy="private", reason="header") == 1
    assert sample(samples, "gateway_privacy_decisions_total", privacy="private", reason="pii:email") == 1
    assert sample(samples, "gateway_overhead_seconds_count", endpoint="embeddings") == 1
