"""The log of a real `phoenix-gateway serve` process: JSON lines, the request id in every line of a
request, the level from the environment, and never a key or a word of the prompt."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import yaml

from gateway.logs import StdlibHandler, configure, get_logger
from tests.e2e.conftest import scrape, wait_for
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.servers import ServerThread, gateway_process

pytestmark = pytest.mark.e2e
SECRET_KEY = "sk-phoenix-very-secret-0123456789"
PROMPT = "the patient Zebulon Quixote was admitted on Tuesday"


def run_gateway(tmp_path: Path, backend: str, level: str, traffic: Any) -> list[str]:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backends": [{"name": "ollama", "type": "ollama", "base_url": backend}],
                "models": [{"name": "llama3.2", "deployments": [{"backend": "ollama"}]}],
                "auth": {"keys": [{"name": "app", "key_env": "APP_KEY"}]},
            }
        )
    )
    env = {**os.environ, "APP_KEY": SECRET_KEY, "PHOENIX_LOG_LEVEL": level}
    log = tmp_path / "stderr.log"
    with gateway_process(["--config", str(config)], log, env) as gateway:
        traffic(gateway.url)
    return log.read_text().splitlines()


def traffic(url: str) -> None:
    auth = {"authorization": f"Bearer {SECRET_KEY}"}
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": PROMPT}]}
    ok = httpx.post(url + "/v1/chat/completions", json=chat, headers={**auth, "x-request-id": "trace-1"})
    assert ok.status_code == 200
    streamed = httpx.post(
        url + "/v1/chat/completions",
        json={**chat, "stream": True},
        headers={**auth, "x-request-id": "trace-2"},
    )
    assert streamed.status_code == 200
    failed = httpx.post(url + "/v1/chat/completions", json=chat, headers={**auth, "x-request-id": "trace-3"})
    assert failed.status_code == 502
    refused = httpx.post(url + "/v1/chat/completions", json=chat, headers={"x-request-id": "trace-4"})
    assert refused.status_code == 401


def test_every_line_of_a_request_carries_its_id_and_nothing_secret(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    fake, server = fake_ollama
    fake.queue(Reply(content="fine"), Reply(content="also fine"), Reply(status=500, error_text="boom"))
    lines = run_gateway(tmp_path, server.url, "info", traffic)
    events = [json.loads(line) for line in lines]  # every line is JSON
    by_request: dict[str, list[str]] = {}
    for event in events:
        assert {"event", "level", "timestamp"} <= event.keys()
        if "request_id" in event:
            by_request.setdefault(event["request_id"], []).append(event["event"])
    assert set(by_request) == {"trace-1", "trace-2", "trace-3", "trace-4"}
    assert all(names[-1] == "request" for names in by_request.values())  # the audit line, last
    assert by_request["trace-3"] == ["request failed", "request"]
    assert by_request["trace-4"] == ["request failed", "request"]
    unbound = [e["event"] for e in events if "request_id" not in e]
    assert "request" not in unbound and "request failed" not in unbound
    text = "\n".join(lines)
    assert SECRET_KEY not in text and "Zebulon" not in text and "Quixote" not in text


def test_a_backend_error_that_quotes_the_prompt_reaches_the_client_but_not_the_log(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    # As vLLM's validation errors quote the offending field's value: the backend's words go to the
    # client, who sent them, and the `request failed` line says only that the backend refused.
    fake, server = fake_ollama
    echo = f"invalid message content: {PROMPT!r}"
    fake.queue(Reply(status=400, error_text=echo), Reply(status=503, error_text=echo))
    fake.queue(Reply(content="one two", error_after=0, error_text=echo))
    answers: list[httpx.Response] = []

    def refused(url: str) -> None:
        auth = {"authorization": f"Bearer {SECRET_KEY}"}
        chat = {"model": "llama3.2", "messages": [{"role": "user", "content": PROMPT}]}
        for body in (chat, chat, {**chat, "stream": True}):
            answers.append(httpx.post(url + "/v1/chat/completions", json=body, headers=auth))

    lines = run_gateway(tmp_path, server.url, "info", refused)
    assert [answer.status_code for answer in answers] == [400, 503, 502]
    assert all(PROMPT in answer.json()["error"]["message"] for answer in answers)
    failures = [event for event in map(json.loads, lines) if event["event"] == "request failed"]
    assert len(failures) == 3
    assert all("not logged" in event["message"] for event in failures), failures
    assert "Zebulon" not in "\n".join(lines)


# Requests that no backend serves: every one is recorded as a chat request is (id -> call, status, endpoint).
UNROUTED = {
    "models-guess": ("GET", "/v1/models", "Bearer guess", 401, "models"),
    "model-guess": ("GET", "/v1/models/llama3.2", "Bearer guess", 401, "models"),
    "models": ("GET", "/v1/models", f"Bearer {SECRET_KEY}", 200, "models"),
    "model-unknown": ("GET", "/v1/models/nope", f"Bearer {SECRET_KEY}", 404, "models"),
    "wrong-method": ("DELETE", "/v1/chat/completions", f"Bearer {SECRET_KEY}", 405, "other"),
    "unknown-path": ("POST", "/v1/responses", f"Bearer {SECRET_KEY}", 404, "other"),
}


def test_models_unknown_paths_and_wrong_methods_get_their_request_line_and_metrics(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    _, server = fake_ollama
    counted: dict[str, float] = {}

    def unrouted(url: str) -> None:
        for request_id, (method, path, key, status, _) in UNROUTED.items():
            headers = {"authorization": key, "x-request-id": request_id}
            response = httpx.request(method, url + path, headers=headers)
            assert response.status_code == status
            assert response.headers.get_list("x-request-id") == [request_id]

        def requests_total() -> dict[str, float]:
            return {
                f"{dict(labels)['endpoint']} {dict(labels)['status']}": value
                for (name, labels), value in scrape(url).items()
                if name == "gateway_requests_total"
            }

        wait_for(lambda: sum(requests_total().values()) >= len(UNROUTED))
        counted.update(requests_total())

    events = [json.loads(line) for line in run_gateway(tmp_path, server.url, "info", unrouted)]
    recorded = {e["request_id"]: (e["endpoint"], e["status"]) for e in events if e["event"] == "request"}
    assert recorded == {request_id: (call[4], call[3]) for request_id, call in UNROUTED.items()}
    assert sum(e["event"] == "request" for e in events) == len(UNROUTED)  # one line each
    assert counted == {"models 401": 2, "models 200": 1, "models 404": 1, "other 405": 1, "other 404": 1}


def test_a_text_completion_of_several_prompts_writes_one_request_line_without_them(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    def completions(url: str) -> None:
        body = {"model": "llama3.2", "prompt": [PROMPT, "and then?"], "stream": True}
        headers = {"authorization": f"Bearer {SECRET_KEY}", "x-request-id": "text-1"}
        answer = httpx.post(url + "/v1/completions", json=body, headers=headers)
        assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
        assert answer.headers["x-request-id"] == "text-1"

    lines = run_gateway(tmp_path, fake_ollama[1].url, "info", completions)
    [line] = [event for event in map(json.loads, lines) if event["event"] == "request"]
    assert (line["request_id"], line["endpoint"], line["status"], line["stream"]) == (
        "text-1",
        "completions",
        200,
        True,
    )
    assert (line["backend"], line["key"], line["prompt_tokens"]) == ("ollama", "app", 24)
    assert "Zebulon" not in "\n".join(lines) and "and then?" not in "\n".join(lines)


def test_the_level_comes_from_the_environment(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    fake, server = fake_ollama
    fake.queue(Reply(content="fine"), Reply(content="also fine"), Reply(status=500, error_text="boom"))
    events = [json.loads(line) for line in run_gateway(tmp_path, server.url, "warning", traffic)]
    assert events, "the 502 is a warning or worse and must be there"
    assert {e["level"] for e in events} <= {"warning", "error"}
    assert not [e for e in events if e["event"] == "request"]


def test_a_terminal_gets_console_lines_and_a_pipe_gets_json() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    before = structlog.get_config()
    try:
        configure("info", stream=terminal)
        get_logger().info("hello", where="terminal")
        configure("info", stream=pipe)
        get_logger().info("hello", where="pipe")
    finally:
        structlog.configure(**before)
    assert "hello" in terminal.getvalue() and not terminal.getvalue().lstrip().startswith("{")
    assert json.loads(pipe.getvalue())["where"] == "pipe"


def test_uvicorns_records_become_json_lines_without_a_stack_trace() -> None:
    pipe = io.StringIO()
    before = structlog.get_config()
    logger = logging.getLogger("uvicorn.error.test")
    handler = StdlibHandler()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        configure("info", stream=pipe)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("Exception in ASGI application")
        logger.error("Cancel %s running task(s), timeout graceful shutdown exceeded", 2)
    finally:
        logger.removeHandler(handler)
        structlog.configure(**before)
    failure, cut = (json.loads(line) for line in pipe.getvalue().splitlines())
    assert (failure["event"], failure["level"], failure["error"]) == (
        "Exception in ASGI application",
        "error",
        "ValueError",
    )
    assert "Traceback" not in pipe.getvalue()
    # the documented shutdown deadline is no error of the gateway's
    assert (cut["event"], cut["level"]) == (
        "Cancel 2 running task(s), timeout graceful shutdown exceeded",
        "warning",
    )


def test_a_record_before_the_logs_are_set_up_is_written_under_an_unknown_env_level(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`uvicorn gateway.cli:app_factory --factory` with PHOENIX_LOG_LEVEL=verbose: uvicorn's first
    record comes before the app names the wrong level, and must not become a logging traceback."""
    monkeypatch.setenv("PHOENIX_LOG_LEVEL", "verbose")
    before = structlog.get_config()
    logger = logging.getLogger("uvicorn.error.early")
    logger.addHandler(StdlibHandler())
    logger.propagate = False
    structlog.reset_defaults()
    try:
        logger.warning("Started server process [%d]", 7)
    finally:
        logger.handlers.clear()
        structlog.configure(**before)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert json.loads(err.splitlines()[-1])["event"] == "Started server process [7]"


def test_a_long_value_from_the_client_is_not_written_into_the_log_and_the_audit_file_whole(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    """A 1 MB model name under `ollama/*` wrote 4 MB into the log (the name twice in each of two
    lines) and its megabyte into the audit record; a 1 MB field value quoted in an error message,
    its megabyte into the log. The name is bounded now (400), and so are messages in a log line."""
    config = tmp_path / "gateway.yaml"
    audit = tmp_path / "audit.jsonl"
    backends = [{"name": "ollama", "type": "ollama", "base_url": fake_ollama[1].url}]
    models = [
        {"name": "llama3.2", "deployments": [{"backend": "ollama"}]},
        {"name": "ollama/*", "deployments": [{"backend": "ollama"}]},
    ]
    config.write_text(
        yaml.safe_dump({"backends": backends, "models": models, "privacy": {"audit_log": str(audit)}})
    )
    log = tmp_path / "stderr.log"
    long = "q" * 1_000_000
    messages = [{"role": "user", "content": "hi"}]
    with gateway_process(["--config", str(config)], log, {**os.environ}) as gateway:
        chat, embeddings = gateway.url + "/v1/chat/completions", gateway.url + "/v1/embeddings"
        for url, body in (
            (chat, {"model": "ollama/" + long, "messages": messages}),
            (chat, {"model": long, "messages": messages}),
            (embeddings, {"model": "ollama/" + long, "input": "x"}),
        ):
            refused = httpx.post(url, json=body, timeout=30)
            assert refused.status_code == 400, refused.text[:300]
            assert refused.json()["error"]["param"] == "model"
        quoted = httpx.post(
            chat, json={"model": "llama3.2", "messages": messages, "metadata": {"privacy": long}}
        )
        assert quoted.status_code == 400
        assert long in quoted.json()["error"]["message"]  # the client gets the whole message
        wait_for(lambda: len(audit.read_text().splitlines()) == 4)
    assert log.stat().st_size < 20_000
    assert audit.stat().st_size < 10_000
    failed = [
        e
        for e in (json.loads(line) for line in log.read_text().splitlines())
        if e["event"] == "request failed"
    ]
    assert failed[-1]["message"].endswith(
        f"... [{len(quoted.json()['error']['message']) - 1000} more characters, not logged]"
    )
