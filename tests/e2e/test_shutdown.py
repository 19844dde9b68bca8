"""SIGTERM on a real `phoenix-gateway serve`: it stops accepting at once, lets the stream in flight
finish, then exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
import yaml

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
        received: list[str] = []
        started = threading.Event()
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}

        def stream() -> None:
            with httpx.stream(
                "POST", gateway.url + "/v1/chat/completions", json=body, timeout=20
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        received.append(line.removeprefix("data: "))
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(5)
        gateway.process.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            for _ in range(50):  # the listening socket closes at once
                httpx.get(gateway.url + "/healthz", timeout=0.5)
                threading.Event().wait(0.02)
        assert reader.is_alive(), "the stream ended before the test could prove anything"
        reader.join(15)
        assert not reader.is_alive()
        # uvicorn ends by re-raising the signal it handled, so a clean stop reports SIGTERM.
        assert gateway.process.wait(timeout=15) == -signal.SIGTERM
    assert received[-1] == "[DONE]"
    text = "".join(
        (json.loads(event)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for event in received[:-1]
    )
    assert text == SLOW.content
