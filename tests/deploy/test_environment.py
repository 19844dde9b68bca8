"""The environment the deployment files give the gateway (docker-compose.yml with .env.example and
with its defaults, the Kubernetes Deployment), handed to a real `phoenix-gateway serve`: the
config file stays what decides, and every key a shipped config names reaches the gateway.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.files import CONFIGS, ROOT, env_example, key_variables, manifest
from tests.deploy.test_compose import compose, compose_gateway_config, config_mount, volumes_of
from tests.fakes.ollama_server import FakeOllama
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import free_port, gateway_process, serve

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


def test_a_reload_under_compose_reads_the_config_as_edited(tmp_path: Path) -> None:
    """The compose file's bind mounts of the config made as Docker makes them (`mount --bind`, in
    a private mount namespace, under a scratch root), over a copy of the repository's config/;
    the host file is then edited as editors and `sed -i` save (a new file renamed over the old)
    and the gateway gets SIGHUP: it serves the edited config."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed"
    gateway_service = compose(env={})["services"]["gateway"]
    path, _, _ = config_mount({})
    repository, root = tmp_path / "repository", tmp_path / "root"
    shutil.copytree(ROOT / "config", repository / "config")
    mounts = []
    for source, target, mode in volumes_of(gateway_service):
        if source.startswith(("./", "/")):
            host, inside = repository / source, root / target.lstrip("/")
            inside.parent.mkdir(parents=True, exist_ok=True)
            inside.mkdir() if host.is_dir() else inside.touch()
            mounts.append(f"mount --bind {'-o ro ' if mode == 'ro' else ''}{host} {inside}")
    edited = repository / compose_gateway_config({}).relative_to(ROOT)

    def write(model: str, ollama_url: str) -> None:
        fresh = edited.with_suffix(".new")
        fresh.write_text(
            yaml.safe_dump(
                {
                    "backends": [{"name": "ollama-1", "type": "ollama", "base_url": ollama_url}],
                    "models": [{"name": model, "deployments": [{"backend": "ollama-1"}]}],
                }
            )
        )
        fresh.replace(edited)

    with serve(FakeOllama().app) as ollama:
        write("before-edit", ollama.url)
        port, log = free_port(), tmp_path / "stderr.log"
        env = process_environment({"PHOENIX_CONFIG": ""})
        env["PHOENIX_CONFIG"] = str(root / path.lstrip("/"))
        serve_command = f"exec {sys.executable} -m gateway serve --port {port}"
        script = " && ".join([*mounts, serve_command])
        command = [unshare, "--mount", "--propagation", "private", "sh", "-c", script]
        with log.open("wb") as sink:
            process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink)
        url = f"http://127.0.0.1:{port}"
        try:
            assert wait_until(lambda: models(url) is not None), log.read_text()[-2000:]
            assert models(url) == ["before-edit"]
            write("after-edit", ollama.url)
            process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: "config reloaded" in log.read_text()), log.read_text()[-2000:]
            assert models(url) == ["after-edit"]
        finally:
            process.terminate()
            process.wait(timeout=30)


def models(url: str) -> list[str] | None:
    try:
        answer = httpx.get(url + "/v1/models", timeout=2)
    except httpx.TransportError:
        return None
    return [model["id"] for model in answer.json()["data"]]


def wait_until(condition: Callable[[], bool], limit: float = 20) -> bool:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
