"""Request limits: each refusal is a 400 (or 413) in OpenAI's error shape that says what was wrong,
and nothing reaches the backend."""

from __future__ import annotations

import socket
import time

import httpx
import orjson
import pytest

from gateway.body import MAX_DEPTH
from gateway.schemas import MAX_MESSAGES
from tests.e2e.conftest import sample, scrape, wait_for
from tests.fakes.ollama_server import FakeOllama
from tests.servers import ServerThread

pytestmark = pytest.mark.e2e
JSON = {"content-type": "application/json"}
LABELS = {"endpoint": "chat", "model": "", "backend": ""}


def nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def chat_with(**extra: object) -> bytes:
    return orjson.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], **extra})


@pytest.mark.parametrize(
    ("body", "status", "message", "param"),
    [
        (
            b'{"model": "llama3.2", "messages": [{"role": "user", "content": "caf\xe9"}]}',
            400,
            "not valid UTF-8",
            None,
        ),
        (chat_with(metadata_extra=nested(MAX_DEPTH + 1)), 400, f"deeper than {MAX_DEPTH} levels", None),
        (b"[" * 2000 + b"]" * 2000, 400, f"deeper than {MAX_DEPTH} levels", None),
        (
            orjson.dumps(
                {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}
            ),
            400,
            f"at most {MAX_MESSAGES} items",
            "messages",
        ),
        (chat_with(n=2), 400, "'n' must be 1", "n"),
    ],
    ids=["utf8", "depth", "depth-beyond-the-parser", "message-count", "n"],
)
def test_a_request_past_a_limit_is_refused_and_never_sent(
    *,
    fake_ollama: tuple[FakeOllama, ServerThread],
    gateway: ServerThread,
    body: bytes,
    status: int,
    message: str,
    param: str | None,
) -> None:
    answer = httpx.post(gateway.url + "/v1/chat/completions", content=body, headers=JSON, timeout=10)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert message in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert fake_ollama[0].chat_bodies() == []


def test_nesting_within_the_limit_is_served(
    fake_ollama: tuple[FakeOllama, ServerThread], gateway: ServerThread
) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(MAX_DEPTH - 4)}}
    answer = httpx.post(gateway.url + "/v1/chat/completions", content=chat_with(tools=[tool]), headers=JSON)
    assert answer.status_code == 200
    assert len(fake_ollama[0].chat_bodies()) == 1


def test_a_client_leaving_mid_body_is_recorded_as_gone_not_as_our_failure(
    fake_ollama: tuple[FakeOllama, ServerThread], gateway: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    body = chat_with()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        client.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(0.2)  # the gateway has begun reading the body
    wait_for(lambda: sample(scrape(gateway.url), "gateway_requests_total", **LABELS, status="499") == 1)
    samples = scrape(gateway.url)
    assert sample(samples, "gateway_requests_total", **LABELS, status="499") == 1
    assert sample(samples, "gateway_requests_total", **LABELS, status="500") == 0
    assert "internal error" not in capsys.readouterr().err
    assert fake_ollama[0].chat_bodies() == []
