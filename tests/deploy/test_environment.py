"""The environment the deployment files give the gateway (docker-compose.yml with .env.example and
with its defaults, the Kubernetes Deployment), handed to a real `phoenix-gateway serve`: the
config file stays what decides, and every key a shipped config names reaches the gateway.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.files import env_example, manifest
from tests.deploy.test_compose import compose
from tests.fakes.ollama_server import FakeOllama
from tests.servers import gateway_process, serve

pytestmark = pytest.mark.e2e
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def compose_environment(dotenv: dict[str, str]) -> dict[str, str]:
    """The gateway service's environment as `docker compose` sets it, with `dotenv` as .env."""
    environment: dict[str, Any] = compose(env=dotenv)["services"]["gateway"]["environment"]
    return {name: str(value) for name, value in environment.items()}


def kubernetes_environment() -> dict[str, str]:
    """The literal `value`s of the Deployment's container env (the Secret's keys left out)."""
    (container,) = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item["value"] for item in container["env"] if "value" in item}


def deployment_environment(source: str) -> dict[str, str]:
    if source == "kubernetes":
        return kubernetes_environment()
    return compose_environment(env_example() if source == "compose-env-example" else {})


def process_environment(deployment: dict[str, str]) -> dict[str, str]:
    """This machine's environment less the gateway's own variables, plus `deployment`'s; the config
    comes from `--config`, since the container's path does not exist here."""
    own = ("PHOENIX_", "OLLAMA_", "OPENAI_", "GEMINI_", "VLLM_", "LLM_")
    env = {name: value for name, value in os.environ.items() if not name.startswith(own)}
    env.update(deployment)
    env.pop("PHOENIX_CONFIG", None)
    return env


@pytest.mark.parametrize("source", ["compose-env-example", "compose-defaults", "kubernetes"])
def test_server_log_level_in_the_config_file_applies(tmp_path: Path, source: str) -> None:
    """An operator who sets `server.log_level: warning` in the mounted config gets no `request`
    info lines: the deployment does not pin the level through PHOENIX_LOG_LEVEL."""
    fake = FakeOllama()
    with serve(fake.app) as ollama:
        config = tmp_path / "gateway.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "server": {"log_level": "warning"},
                    "backends": [{"name": "ollama-1", "type": "ollama", "base_url": ollama.url}],
                    "models": [{"name": "llama3.2", "deployments": [{"backend": "ollama-1"}]}],
                }
            )
        )
        env = process_environment(deployment_environment(source))
        with gateway_process(["--config", str(config)], tmp_path / "stderr.log", env=env) as gateway:
            answer = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "llama3.2", **CHAT})
            assert answer.status_code == 200, answer.text
    # the process has drained and exited: a request line would have been written by now
    events = [event["event"] for event in gateway.log_events()]
    assert "request" not in events, events
    assert len(fake.chat_bodies()) == 1
