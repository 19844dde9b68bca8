"""The deployment files as the tests read them: where they are in the repository,
`phoenix-gateway check-config` run as a user runs it, the Dockerfile parsed into instructions and
stages, .env.example, and the Kubernetes manifests. Nothing here needs Docker, a cluster or the
network.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.cli import parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
KUBERNETES = ROOT / "deploy" / "kubernetes"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))

CONFIG_IN_CONTAINER = "/etc/phoenix/gateway.yaml"

# --- running the CLI ---------------------------------------------------------------------------


def key_variables(path: Path) -> set[str]:
    """The environment variables a config file reads secrets from (read as plain YAML, so that
    a broken file has them too)."""
    data = yaml.safe_load(path.read_text())
    entries = [*data.get("backends", []), *data.get("auth", {}).get("keys", [])]
    return {entry[key] for entry in entries for key in ("api_key_env", "key_env") if entry.get(key)}


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """`phoenix-gateway check-config PATH` as a user runs it, with made-up values for the keys."""
    env = {name: value for name, value in os.environ.items() if name != "PHOENIX_CONFIG"}
    env.update(dict.fromkeys(key_variables(path), "dummy-key-for-check-config"))
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


# --- Dockerfile ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """The arguments as argv: JSON (exec) form, else split like the shell would."""
        text = self.arguments.strip()
        if text.startswith("["):
            argv: list[str] = json.loads(text)
            return argv
        return shlex.split(text)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their line continuations joined; comment lines and blank lines dropped,
    inside a continued instruction too, as Docker does."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each starting with its FROM."""
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        assert result, f"{instruction.keyword} before the first FROM"
        result[-1].append(instruction)
    return result


def only(stage: list[Instruction], keyword: str) -> Instruction:
    (found,) = [instruction for instruction in stage if instruction.keyword == keyword]
    return found


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def runtime_stage() -> list[Instruction]:
    """The runtime (last) stage of the Dockerfile."""
    return stages(parse_dockerfile(DOCKERFILE.read_text()))[-1]


def served_argv(image: list[Instruction]) -> list[str]:
    return only(image, "ENTRYPOINT").exec_form() + only(image, "CMD").exec_form()


def served_port(image: list[Instruction]) -> int:
    port: int = parser().parse_args(served_argv(image)[1:]).port
    return port


# --- .env.example --------------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=VALUE: {line!r}"
            env[name.strip()] = value.strip()
    return env


# --- deploy/kubernetes ---------------------------------------------------------------------------


def kubernetes_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, document)
        for path in sorted(KUBERNETES.rglob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def manifest(kind: str) -> dict[str, Any]:
    (document,) = [document for _, document in kubernetes_documents() if document["kind"] == kind]
    return document
