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

from tests.deploy.files import CONFIGS, ROOT, env_example, key_variables, manifest
from tests.deploy.test_compose import compose
from tests.fakes.ollama_server import FakeOllama
from tests.fakes.openai_server import FakeOpenAI
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


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_compose_passes_every_key_a_shipped_config_reads(path: Path) -> None:
    """GATEWAY_CONFIG may pick any config in config/: the variables it reads its keys from are
    passed to the gateway, and listed (empty) in .env.example."""
    needed = key_variables(path)
    assert needed <= set(compose_environment(env_example())), sorted(needed)
    assert needed <= set(env_example()), sorted(needed)
    assert all(env_example()[name] == "" for name in needed)


def test_the_vllm_key_in_dotenv_reaches_vllm_under_compose(tmp_path: Path) -> None:
    """config/vllm.yaml under compose, with VLLM_API_KEY in .env, against servers that want it."""
    key = "vllm-test-key"
    data = yaml.safe_load((ROOT / "config" / "vllm.yaml").read_text())
    fakes = [FakeOpenAI(models=["meta-llama/Llama-3.1-8B-Instruct"], api_key=key) for _ in data["backends"]]
    with serve(fakes[0].app) as first, serve(fakes[1].app) as second:
        for backend, server in zip(data["backends"], (first, second), strict=True):
            backend["base_url"] = server.url + "/v1"
        config = tmp_path / "vllm.yaml"
        config.write_text(yaml.safe_dump(data))
        env = process_environment(compose_environment({**env_example(), "VLLM_API_KEY": key}))
        with gateway_process(["--config", str(config)], tmp_path / "stderr.log", env=env) as gateway:
            answer = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "llama3.1-8b", **CHAT})
    assert answer.status_code == 200, answer.text
    assert sum(len(fake.chat_bodies()) for fake in fakes) == 1
