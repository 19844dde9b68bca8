"""SIGTERM on a real `phoenix-gateway serve`: it stops accepting at once, lets the stream in flight
finish, then exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.cli import main
from tests.e2e.conftest import StreamInBackground, wait_for
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.servers import ServerThread, gateway_process
from tests.test_audit import locked_elsewhere

pytestmark = pytest.mark.e2e
SLOW = Reply(content=" ".join(f"w{i}" for i in range(60)), delay_between=0.05)  # about 3 s


CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def write_config(tmp_path: Path, url: str, **server: float) -> list[str]:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": server,
                "backends": [{"name": "ollama", "type": "ollama", "base_url": url}],
                "models": [{"name": "llama3.2", "deployments": [{"backend": "ollama"}]}],
            }
        )
    )
    return ["--config", str(config)]


ENV = {k: v for k, v in os.environ.items() if not k.startswith("PHOENIX_")}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_drains_the_stream_in_flight_and_refuses_new_connections(
    workers: str, tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    fake, server = fake_ollama
    fake.default = SLOW
    args = [*write_config(tmp_path, server.url), "--workers", workers]
    with gateway_process(args, tmp_path / "stderr.log", ENV) as gateway:
        stream = StreamInBackground(gateway.url, CHAT)
        assert stream.started.wait(5)
        gateway.process.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.TransportError):  # one caught in the kernel's backlog may be reset
            for _ in range(50):  # the listening socket closes at once
                httpx.get(gateway.url + "/healthz", timeout=0.5)
                time.sleep(0.02)
        with pytest.raises(httpx.ConnectError):  # and from then on nothing is accepted
            httpx.get(gateway.url + "/healthz", timeout=0.5)
        assert stream.running(), "the stream ended before the test could prove anything"
        stream.join(15)
        assert not stream.running()
        # uvicorn ends by re-raising the signal it handled, so a clean stop reports SIGTERM.
        assert gateway.process.wait(timeout=15) == -signal.SIGTERM
    assert stream.events[-1] == "[DONE]"
    assert stream.text() == SLOW.content


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_stops_the_gateway_by_sigint_as_sigterm_does_by_sigterm(
    workers: str, tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    args = [*write_config(tmp_path, fake_ollama[1].url), "--workers", workers]
    with gateway_process(args, tmp_path / "stderr.log", ENV) as gateway:
        assert httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        gateway.process.send_signal(signal.SIGINT)
        assert gateway.process.wait(timeout=15) == -signal.SIGINT  # 130 from a shell


def test_requests_longer_than_the_shutdown_timeout_are_cut_with_a_503_and_their_upstream_closed(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    fake, server = fake_ollama
    long = " ".join(f"w{i}" for i in range(100))
    fake.queue(Reply(content=long, delay_between=0.1))  # a 10 s stream
    fake.queue(Reply(content=long, delay_first=10))  # a non-streaming answer in 10 s
    args = write_config(tmp_path, server.url, shutdown_timeout=1)
    with gateway_process(args, tmp_path / "stderr.log", ENV) as gateway:
        stream = StreamInBackground(gateway.url, CHAT)
        assert stream.started.wait(5)
        unary: list[httpx.Response] = []
        waiting = threading.Thread(
            target=lambda: unary.append(
                httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=20)
            )
        )
        waiting.start()
        wait_for(lambda: len(fake.chat_bodies()) == 2, timeout=5)
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        gateway.process.wait(timeout=15)
        stopped = time.monotonic() - signalled
        stream.join(5)
        waiting.join(5)
        events = gateway.log_events()
    assert 0.9 < stopped < 5, stopped  # the deadline, not the 10 s answers
    error = json.loads(stream.events[-1])["error"]
    assert error["code"] == "shutting_down"
    assert "server.shutdown_timeout" in error["message"]
    assert 0 < len(stream.text().split()) < 100
    assert unary[0].status_code == 503
    assert unary[0].json()["error"]["code"] == "shutting_down"
    # the stream's generation was stopped upstream, not left running (the fake cannot see a
    # disconnect while it sleeps before a non-streaming answer)
    wait_for(lambda: fake.cancelled == 1, timeout=2)
    assert fake.cancelled == 1
    records = [e for e in events if e.get("event") == "request"]
    assert sorted((r["stream"], r["status"], r.get("error")) for r in records) == [
        (False, 503, "server_error"),
        (True, 503, "server_error"),
    ]
    lines = (tmp_path / "stderr.log").read_text().splitlines()
    assert [line for line in lines if not line.startswith("{")] == []  # uvicorn's lines are JSON too
    [cut] = [e for e in events if "timeout graceful shutdown exceeded" in e["event"]]
    assert (cut["level"], cut["logger"]) == ("warning", "uvicorn.error")  # documented: not an error


def test_audit_records_waiting_for_the_files_lock_are_written_before_the_process_exits(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    """A backup job holds the audit file's lock as SIGTERM comes: the records wait for it, then
    the process exits, not before (README: they get 5 s more)."""
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backends": [{"name": "ollama", "type": "ollama", "base_url": fake_ollama[1].url}],
                "models": [{"name": "llama3.2", "deployments": [{"backend": "ollama"}]}],
                "privacy": {"audit_log": str(audit)},
            }
        )
    )
    with gateway_process(["--config", str(config)], tmp_path / "stderr.log", ENV) as gateway:
        with locked_elsewhere(audit):
            for _ in range(3):
                assert (
                    httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
                )
            gateway.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the lock stays held while the gateway shuts down
            assert audit.read_text() == ""
        assert gateway.process.wait(10) == -signal.SIGTERM
    assert main(["audit", "verify", str(audit)]) == 0
    assert len(audit.read_text().splitlines()) == 3
