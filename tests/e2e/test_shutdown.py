"""SIGTERM on a real `phoenix-gateway serve`: it stops accepting at once, lets the stream in flight
finish, then exits cleanly."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import StreamInBackground
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.servers import ServerThread, gateway_process

pytestmark = pytest.mark.e2e
SLOW = Reply(content=" ".join(f"w{i}" for i in range(30)), delay_between=0.05)  # about 1.5 s


def test_sigterm_drains_the_stream_in_flight_and_refuses_new_connections(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    fake, server = fake_ollama
    fake.default = SLOW
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backends": [{"name": "ollama", "type": "ollama", "base_url": server.url}],
                "models": [{"name": "llama3.2", "deployments": [{"backend": "ollama"}]}],
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHOENIX_")}
    with gateway_process(["--config", str(config)], tmp_path / "stderr.log", env) as gateway:
        stream = StreamInBackground(
            gateway.url, {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert stream.started.wait(5)
        gateway.process.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            for _ in range(50):  # the listening socket closes at once
                httpx.get(gateway.url + "/healthz", timeout=0.5)
                time.sleep(0.02)
        assert stream.running(), "the stream ended before the test could prove anything"
        stream.join(15)
        assert not stream.running()
        # uvicorn ends by re-raising the signal it handled, so a clean stop reports SIGTERM.
        assert gateway.process.wait(timeout=15) == -signal.SIGTERM
    assert stream.events[-1] == "[DONE]"
    assert stream.text() == SLOW.content
