"""`phoenix-gateway serve` as a newcomer runs it: a real process, no config file, Ollama from the env."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import uvicorn

from gateway import cli, pii, protocol
from gateway.app import create_app
from gateway.cli import main
from gateway.config import ConfigError, parse_config
from tests.fakes.faulty_server import FaultyOllama
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.servers import ServerThread, gateway_process

pytestmark = pytest.mark.e2e


@pytest.fixture
def served(fake_ollama: tuple[FakeOllama, ServerThread], tmp_path: Path) -> Iterator[str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "OPENAI_", "GEMINI_", "PHOENIX_"))
    }
    env.update(OLLAMA_BASE_URL=fake_ollama[1].url, OLLAMA_MODEL="llama3.2", LLM_PROVIDER="ollama")
    with gateway_process([], tmp_path / "stderr.log", env) as gateway:
        yield gateway.url


def test_zero_file_default_serves_ollama_models_by_bare_name(
    fake_ollama: tuple[FakeOllama, ServerThread], served: str
) -> None:
    fake, _ = fake_ollama
    fake.queue(Reply(content="hi"), Reply(content="hey"))
    with openai.OpenAI(base_url=served + "/v1", api_key="x", max_retries=0) as api:
        ids = {m.id for m in api.models.list()}
        assert {"default", "llama3.2:latest", "ollama/qwen2.5:0.5b"} <= ids
        bare = api.chat.completions.create(model="qwen2.5:0.5b", messages=[{"role": "user", "content": "x"}])
        aliased = api.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}])
    assert (bare.choices[0].message.content, aliased.choices[0].message.content) == ("hi", "hey")
    assert [b["model"] for b in fake.chat_bodies()] == ["qwen2.5:0.5b", "llama3.2"]


def test_zero_file_default_retrieves_an_ollama_model_by_the_names_chat_takes(served: str) -> None:
    with openai.OpenAI(base_url=served + "/v1", api_key="x", max_retries=0) as api:
        for name in ("llama3.2", "llama3.2:latest", "ollama/llama3.2", "ollama/llama3.2:latest"):
            assert api.models.retrieve(name).id == name
        with pytest.raises(openai.NotFoundError):
            api.models.retrieve("qwen2.5")  # only qwen2.5:0.5b is there


MINIMAL: dict[str, Any] = {
    "backends": [{"name": "ollama-1", "type": "ollama"}],
    "models": [{"name": "llama3.2", "deployments": [{"backend": "ollama-1"}]}],
}


def serve_dry(
    config: dict[str, Any], args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """`serve --config FILE ARGS` with uvicorn.run replaced (nothing is bound): what it was given."""
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps({**MINIMAL, **config}))
    started: list[dict[str, Any]] = []

    def serve_workers(app: str, **options: Any) -> int:
        started.append(options)
        return 0

    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append(options))
    monkeypatch.setattr(cli, "serve_workers", serve_workers)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("PHOENIX_")})
    assert main(["serve", "--config", str(path), *args]) == 0
    return started[0]


def test_a_pii_detector_that_misses_what_it_must_find_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(pii, "_INTERNATIONAL", re.compile("(?!)"))  # as CPython 3.11.2 matched it
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(MINIMAL))
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append(options))
    assert main(["serve", "--config", str(path)]) == 1
    assert started == []
    error = capsys.readouterr().err
    assert "error: privacy.detect_pii is on, but on this Python" in error
    assert "the PII detector misses phone in its own samples" in error
    with pytest.raises(ConfigError, match="misses phone"):
        create_app(parse_config(MINIMAL, "test"))
    assert main(["check-config", str(path)]) == 1  # a config check says what serve would do
    assert "the PII detector misses phone" in capsys.readouterr().err
    # Turned off knowingly, there is nothing to check
    assert serve_dry({"privacy": {"detect_pii": False}}, [], tmp_path, monkeypatch)["port"]


def test_an_unknown_log_level_in_the_environment_stops_serve_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(MINIMAL))
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append(options))
    monkeypatch.setattr(os, "environ", {**os.environ, "PHOENIX_LOG_LEVEL": "verbose"})
    assert main(["serve", "--config", str(path)]) == 1
    assert started == []
    expected = "error: environment: PHOENIX_LOG_LEVEL: expected debug, info, warning or error, got 'verbose'"
    assert capsys.readouterr().err.strip() == expected
    monkeypatch.setattr(os, "environ", {**os.environ, "PHOENIX_LOG_LEVEL": "WARNING"})
    assert main(["serve", "--config", str(path)]) == 0  # as before, in any case
    assert os.environ["PHOENIX_LOG_LEVEL"] == "warning"


def test_the_log_level_option_takes_any_case_as_the_environment_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "PHOENIX_LOG_LEVEL"})
    serve_dry({}, ["--log-level", "DEBUG"], tmp_path, monkeypatch)
    assert os.environ["PHOENIX_LOG_LEVEL"] == "debug"  # what the workers and reloads keep
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--log-level", "verbose"])
    assert refused.value.code == 2


def test_an_audit_file_it_cannot_open_stops_serve_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = tmp_path / "no-such-directory" / "audit.jsonl"
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps({**MINIMAL, "privacy": {"audit_log": str(audit)}}))
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append(options))
    assert main(["serve", "--config", str(path)]) == 1
    assert started == []  # not left to each worker to fail, and be started again, for ever
    expected = f"error: cannot open audit log {audit}: No such file or directory"
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [("10.1.2.3", False, True), ("10.1.2.3", True, False), ("127.0.0.1", False, False)],
)
def test_an_open_gateway_beyond_loopback_is_warned_about(
    *,
    host: str,
    keys: bool,
    warned: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = {"auth": {"keys": [{"name": "app", "key_sha256": "ab" * 32}]}} if keys else {}
    assert serve_dry(config, ["--host", host], tmp_path, monkeypatch)["host"] == host
    assert ("open to anyone" in capsys.readouterr().err) is warned


@pytest.mark.parametrize(
    ("workers", "rate_limits", "warned"),
    [
        (2, {"default": {"rpm": 10}}, True),
        (1, {"default": {"rpm": 10}}, False),
        (2, {"default": {"rpm": 10}, "redis_url": "redis://127.0.0.1:6379/0"}, False),
        (2, {}, False),
    ],
)
def test_per_worker_rate_limits_are_warned_about(
    *,
    workers: int,
    rate_limits: dict[str, Any],
    warned: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = serve_dry({"rate_limits": rate_limits}, ["--workers", str(workers)], tmp_path, monkeypatch)
    assert options["workers"] == workers
    assert ("rate limits are kept per worker" in capsys.readouterr().err) is warned


@pytest.mark.parametrize(("value", "warned"), [(None, True), ("", True), ("sk-set", False)])
def test_a_backend_whose_key_variable_is_unset_or_empty_is_warned_about(
    value: str | None,
    warned: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("CLOUD_KEY", raising=False)
    if value is not None:
        monkeypatch.setenv("CLOUD_KEY", value)
    cloud = {"name": "cloud", "type": "openai", "api_key_env": "CLOUD_KEY"}
    serve_dry(
        {"backends": [cloud], "models": [{"name": "m", "deployments": [{"backend": "cloud"}]}]},
        [],
        tmp_path,
        monkeypatch,
    )
    warnings = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "api_key_env" in line]
    expected = {"backend": "cloud", "variable": "CLOUD_KEY", "level": "warning"}
    assert [{k: w[k] for k in expected} for w in warnings] == ([expected] if warned else [])
    assert all("sk-set" not in str(w) for w in warnings)


@pytest.mark.parametrize(
    "args",
    [["--port", "70000"], ["--port", "0"], ["--port", "http"], ["--workers", "0"], ["--workers", "-1"]],
)
def test_a_port_or_worker_count_out_of_range_is_refused(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append(options))
    with pytest.raises(SystemExit) as exited:
        main(["serve", *args])
    assert exited.value.code == 2
    assert started == []
    assert f"argument {args[0]}: expected a whole number" in capsys.readouterr().err


def test_the_highest_port_is_taken_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert serve_dry({}, ["--port", "65535"], tmp_path, monkeypatch)["port"] == 65535


@pytest.mark.parametrize("backend", ["unreachable", "reachable"])
def test_a_port_in_use_stops_serve_with_the_address_named(backend: str, tmp_path: Path) -> None:
    """With a backend that takes connections, the start-up probes are connecting when the failed
    start shuts the app down: uvloop crashed (SIGSEGV) when that cancelled its create_connection."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "PHOENIX_"))}
    with contextlib.ExitStack() as stack:
        if backend == "reachable":
            ollama = stack.enter_context(FaultyOllama().running())
            env["OLLAMA_BASE_URL"] = ollama.url
        taken = stack.enter_context(socket.socket())
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
    stderr = ran.stderr.decode()
    assert ran.returncode == 3  # uvicorn's start-up failure
    assert f"cannot listen on 127.0.0.1 port {port}: address already in use" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "no-uvloop"])
def test_serve_runs_on_the_accepting_loop_where_uvloop_is_installed(
    *, uvloop: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: find_spec(name) if uvloop or name != "uvloop" else None
    )
    options = serve_dry({}, [], tmp_path, monkeypatch)
    assert options["loop"] == ("gateway.listen:GatewayLoop" if uvloop else "auto")


def head_request(url: str, filler: int) -> bytes:
    """A raw request to /healthz with `filler` bytes of headers, and what came back."""
    host, port = url.removeprefix("http://").split(":")
    lines = b"".join(b"x-filler-%d: %s\r\n" % (i, b"y" * 1000) for i in range(filler // 1000))
    with socket.create_connection((host, int(port)), timeout=5) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n" + lines + b"\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and (b"ok" in answer or b"Invalid" in answer):
                break
    return answer


def receive_until(client: socket.socket, marker: bytes) -> bytes:
    """What comes on `client` until `marker` has, or the gateway closes the connection."""
    received = b""
    while marker not in received and (chunk := client.recv(65536)):
        received += chunk
    return received


def test_a_request_head_past_64_kib_is_refused_and_its_connection_closed(served: str) -> None:
    assert head_request(served, 60_000).startswith(b"HTTP/1.1 200")  # large, within the limit
    refused = head_request(served, 70_000)
    assert refused.startswith(b"HTTP/1.1 400"), refused[:200]
    assert b"connection: close" in refused.lower()
    assert head_request(served, 0).startswith(b"HTTP/1.1 200")  # and the gateway goes on serving


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (
            b"GET /healthz HTTP/1.1\r\nhost: gateway\r\nx-big: " + b"y" * 70_000 + b"\r\n\r\n",
            "The request head (request line and headers) is larger than 64 KiB.",
        ),
        (b"GET /v1/models HTTP/1.1 extra\r\nhost: gateway\r\n\r\n", "The request is not valid HTTP/1.1."),
        (b"GET /v1/models HTTP/1.1\r\nho st: gateway\r\n\r\n", "The request is not valid HTTP/1.1."),
    ],
    ids=["head-past-64-kib", "malformed-request-line", "space-in-a-header-name"],
)
def test_a_request_the_parser_refuses_gets_an_openai_error(
    served: str, request_bytes: bytes, message: str
) -> None:
    """As every other error (uvicorn's own 400 was text/plain 'Invalid HTTP request received.')."""
    host, port = served.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=5) as client:
        client.sendall(request_bytes)
        while chunk := client.recv(65536):  # to the end: the gateway closes the connection
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 400 bad request"
    assert b"content-type: application/json" in lines
    assert b"connection: close" in lines
    assert b"content-length: %d" % len(body) in lines
    assert json.loads(body) == {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }
    assert head_request(served, 0).startswith(b"HTTP/1.1 200")  # and the gateway goes on serving


def test_a_request_header_that_never_ends_is_refused_before_it_is_all_read(served: str) -> None:
    host, port = served.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=5) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\nx-big: ")
        try:
            for _ in range(64):  # 64 MiB without a line end, unless the gateway stops it first
                client.sendall(b"y" * 1024 * 1024)
                sent += 1
        except OSError:  # reset: the gateway closed the connection with most of it unread
            pass
        refused = client.recv(65536)
    assert refused.startswith(b"HTTP/1.1 400"), refused[:200]
    assert sent < 32
    assert head_request(served, 0).startswith(b"HTTP/1.1 200")  # and the gateway goes on serving


@pytest.mark.parametrize("command", [["check-config", "config/hybrid.yaml"], ["audit", "verify", "AUDIT"]])
def test_a_command_whose_reader_left_ends_without_a_traceback(command: list[str], tmp_path: Path) -> None:
    """`phoenix-gateway check-config FILE | head -1`: the reader is gone before the table is written.
    No BrokenPipeError traceback on the terminal, and 141, as a shell shows for a command SIGPIPE
    ended, not 0 (nothing was read) nor 1 (the config is fine)."""
    audit = tmp_path / "audit.jsonl"
    audit.write_text("")  # an empty chain is intact: `audit verify` exits 0 when it can write
    command = [str(audit) if part == "AUDIT" else part for part in command]
    root = Path(__file__).resolve().parents[2]
    reader, writer = os.pipe()
    os.close(reader)  # the reader left before the first write
    try:
        ran = subprocess.run(
            [sys.executable, "-m", "gateway", *command],
            cwd=root,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)
    assert "Traceback" not in ran.stderr, ran.stderr
    assert "BrokenPipeError" not in ran.stderr, ran.stderr
    assert ran.returncode == cli.BROKEN_PIPE == 141


def test_models_lists_on_stdout_and_warns_on_stderr_in_json(
    fake_ollama: tuple[FakeOllama, ServerThread], tmp_path: Path
) -> None:
    path = tmp_path / "gateway.yaml"
    backends = [
        {"name": "ollama-1", "type": "ollama", "base_url": fake_ollama[1].url},
        {"name": "down", "type": "ollama", "base_url": "http://127.0.0.1:9"},  # the discard port
    ]
    path.write_text(json.dumps({**MINIMAL, "backends": backends}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "PHOENIX_"))}
    ran = subprocess.run(
        [sys.executable, "-m", "gateway", "models", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 1  # a backend could not be listed: a script checking them sees it
    assert ran.stdout.splitlines() == [
        "ollama-1 [ollama, local]:",
        "  llama3.2:latest",
        "  qwen2.5:0.5b",
        "  nomic-embed-text:latest",
        "down [ollama, local]:",
        "  (unreachable: see the log line on stderr)",
    ]
    [warning] = [json.loads(line) for line in ran.stderr.splitlines()]
    assert (warning["event"], warning["backend"], warning["level"]) == (
        "model listing failed",
        "down",
        "warning",
    )


def test_a_connection_that_sends_nothing_is_closed_as_an_idle_one_is(served: str) -> None:
    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as silent:
        started = time.monotonic()
        assert silent.recv(1024) == b""  # the gateway closed it
        waited = time.monotonic() - started
    assert 4 < waited < 15, waited  # uvicorn's keep-alive timeout, 5 s, and not for good
    assert head_request(served, 0).startswith(b"HTTP/1.1 200")


def test_a_request_head_sent_a_byte_at_a_time_is_answered_408_at_the_head_deadline(
    gateway: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "HEAD_SECONDS", 1.0)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as slow:
        started = time.monotonic()
        head = b"GET /healthz HTTP/1.1\r\nhost: gateway\r\nx-slow: "
        slow.sendall(head)
        try:
            for _ in range(40):  # 10 s of a byte every 0.25 s, unless the gateway stops it first
                time.sleep(0.25)
                slow.sendall(b"y")
        except OSError:
            pass
        answer = slow.recv(65536)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert waited < 5, waited
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as whole:
        whole.sendall(head + b"y\r\n\r\n")  # a head that arrives whole is served as ever
        assert whole.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_head_pipelined_behind_a_long_stream_does_not_cut_the_stream_at_the_head_deadline(
    fake_ollama: tuple[FakeOllama, ServerThread], gateway: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head deadline runs while nothing is being answered: a 408 in the middle of an answer
    would break it."""
    monkeypatch.setattr(protocol, "HEAD_SECONDS", 0.5)
    fake_ollama[0].queue(Reply(pieces=[f"w{i} " for i in range(10)], delay_between=0.2))
    body = json.dumps({"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    request = "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
    request += f"content-length: {len(body)}\r\n\r\n{body}"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as client:
        client.sendall(request.encode())
        time.sleep(0.3)  # the stream is under way
        client.sendall(b"GET /healthz HTTP/1.1\r\nhost: ga")  # the next head, cut short
        received = receive_until(client, b"data: [DONE]")
    assert b"data: [DONE]" in received, received[-300:]
    assert b"408" not in received
    assert received.count(b'"content":"w') == 10


def test_a_head_cut_short_in_the_same_read_as_a_whole_request_is_timed_too(
    gateway: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "HEAD_SECONDS", 0.5)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as client:
        started = time.monotonic()
        client.sendall(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\nGET /healthz HTTP/1.1\r\nhost: ga")
        received = receive_until(client, b"408 Request Timeout")
        waited = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 200"), received[:100]
    assert b"HTTP/1.1 408 Request Timeout" in received  # not closed silently by the 5 s idle timer
    assert waited < 3, waited
