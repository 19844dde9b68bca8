"""What /metrics shows after known traffic: label values bounded by the config, and exact counts on
the embeddings, privacy and streaming paths (read back through prometheus_client's parser)."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message

from gateway.app import HotRoutes, create_app
from gateway.state import State, state_of
from tests.e2e.conftest import ollama_config, sample, scrape
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


def requests_counted(state: State, endpoint: str) -> float:
    """gateway_requests_total summed over its series for one endpoint, read from the registry."""
    text = state.metrics.render().decode()
    return sum(
        point.value
        for family in text_string_to_metric_families(text)
        for point in family.samples
        if point.name == "gateway_requests_total" and point.labels.get("endpoint") == endpoint
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "endpoint", "body"),
    [
        ("/v1/chat/completions", "chat", {"model": "llama3.2", "messages": HI}),
        ("/v1/embeddings", "embeddings", {"model": "embed", "input": "hi"}),
    ],
)
async def test_an_answer_goes_out_before_its_bookkeeping(
    fake_ollama: tuple[FakeOllama, ServerThread], path: str, endpoint: str, body: dict[str, object]
) -> None:
    """The request's metrics, audit line and rate-limit settlement run once its JSON answer has
    been handed to the server, not before: the client does not wait for them. They have run by
    the time the app returns, so before the loop can read another request."""
    _, backend = fake_ollama
    app = create_app(ollama_config(backend.url), environ={})
    assert isinstance(app, HotRoutes)
    state = state_of(app.app)
    content = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())],
        "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    sent: list[tuple[object, int, float]] = []  # (message type, requests in flight, requests counted)

    async def receive() -> Message:
        return {"type": "http.request", "body": content, "more_body": False}

    async def send(message: Message) -> None:
        sent.append((message["type"], state.active, requests_counted(state, endpoint)))

    try:
        await app(scope, receive, send)
    finally:
        await state.aclose()
    assert [kind for kind, _, _ in sent] == ["http.response.start", "http.response.body"]
    assert sent[-1][1:] == (1, 0), "the request was counted before its answer went out"
    assert (state.active, requests_counted(state, endpoint)) == (0, 1)
