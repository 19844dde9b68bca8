"""The Dockerfile and .dockerignore, read rather than built (building needs a Docker engine): python
slim stages, a numeric non-root user that the Kubernetes Deployment agrees with, the command parsed
by the gateway's own argument parser, the port and config path, the HEALTHCHECK's Python run
against a loopback server, and a build context that holds what the Dockerfile copies and nothing
secret.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.cli import parser
from tests.deploy.files import (
    CONFIG_IN_CONTAINER,
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    Instruction,
    env_of,
    manifest,
    only,
    parse_dockerfile,
    served_argv,
    served_port,
    stages,
)


def options_and_command(arguments: str) -> tuple[dict[str, str], Instruction]:
    """HEALTHCHECK's `--name=value` options and its CMD."""
    options: dict[str, str] = {}
    rest = arguments
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        name, _, value = option[2:].partition("=")
        options[name] = value
        rest = rest.lstrip()
    keyword, _, command = rest.partition(" ")
    return options, Instruction(keyword.upper(), command.strip())


def test_dockerfile_parser_joins_continuations_and_drops_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.11-slim AS build\n\n"
        "RUN apt-get update \\\n"
        "    # a comment inside the continuation\n"
        "\n"
        "    && true\n"
        'CMD ["serve", "--host", "0.0.0.0"]\n'
        "FROM python:3.11-slim\n"
        "ENV A=1 \\\n    B='two words'\n"
    )
    instructions = parse_dockerfile(text)
    assert [i.keyword for i in instructions] == ["FROM", "RUN", "CMD", "FROM", "ENV"]
    assert instructions[1].arguments == "apt-get update && true"
    assert instructions[2].exec_form() == ["serve", "--host", "0.0.0.0"]
    assert [len(stage) for stage in stages(instructions)] == [3, 2]
    assert env_of(stages(instructions)[1]) == {"A": "1", "B": "two words"}


def test_every_stage_is_built_on_python_slim() -> None:
    all_stages = stages(parse_dockerfile(DOCKERFILE.read_text()))
    assert len(all_stages) >= 2, "a multi-stage build"
    for stage in all_stages:
        base = stage[0].arguments.split()[0]
        assert re.fullmatch(r"python:3\.1[1-9]-slim", base), base


def test_build_stage_installs_the_project_and_the_image_copies_only_its_result() -> None:
    build, *_, runtime = stages(parse_dockerfile(DOCKERFILE.read_text()))
    name = build[0].arguments.split()[-1]
    assert build[0].arguments.split()[-2].upper() == "AS"
    runs = " ".join(instruction.arguments for instruction in build if instruction.keyword == "RUN")
    assert "pip install -c constraints.txt ." in runs
    copies = [instruction.arguments for instruction in runtime if instruction.keyword == "COPY"]
    assert copies and all(copy.startswith(f"--from={name} ") for copy in copies), copies
    venv = copies[0].split()[-1]
    assert env_of(runtime)["PATH"].startswith(f"{venv}/bin:")


def test_image_runs_as_a_non_root_user(image: list[Instruction]) -> None:
    user = only(image, "USER").arguments
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000, "a numeric uid, so that runAsNonRoot can check it"
    assert gid.isdigit() and int(gid) >= 1000
    deployment = manifest("Deployment")
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (pod_security["runAsUser"], pod_security["runAsGroup"]) == (int(uid), int(gid))


def test_image_serves_phoenix_gateway_on_all_interfaces(image: list[Instruction]) -> None:
    argv = served_argv(image)
    assert argv[0] == "phoenix-gateway"
    args = parser().parse_args(argv[1:])
    assert (args.command, args.host, args.port, args.config) == ("serve", "0.0.0.0", 8080, None)
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'phoenix-gateway = "gateway.__main__:main"' in scripts


def test_image_exposes_the_port_it_serves_on(image: list[Instruction]) -> None:
    assert only(image, "EXPOSE").arguments.split() == [str(served_port(image))]


def test_image_reads_its_config_from_the_documented_path(image: list[Instruction]) -> None:
    assert env_of(image)["PHOENIX_CONFIG"] == CONFIG_IN_CONTAINER


class Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Unhealthy(Health):
    status = 503


@pytest.fixture
def loopback_server(request: pytest.FixtureRequest) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def healthcheck(image: list[Instruction]) -> tuple[dict[str, str], list[str]]:
    options, command = options_and_command(only(image, "HEALTHCHECK").arguments)
    assert command.keyword == "CMD"
    return options, command.exec_form()


def test_healthcheck_asks_healthz_with_python_since_slim_has_no_curl(image: list[Instruction]) -> None:
    options, argv = healthcheck(image)
    assert set(options) >= {"interval", "timeout", "retries"}
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    compile(code, "HEALTHCHECK", "exec")
    assert f"http://127.0.0.1:{served_port(image)}/healthz" in code


@pytest.mark.parametrize(
    ("loopback_server", "healthy"), [(Health, True), (Unhealthy, False)], indirect=["loopback_server"]
)
def test_healthcheck_fails_when_healthz_does_not_answer_ok(
    image: list[Instruction], loopback_server: int, healthy: bool
) -> None:
    """The healthcheck's own code, pointed at a loopback server answering 200 or 503."""
    code = healthcheck(image)[1][2].replace(f":{served_port(image)}/", f":{loopback_server}/")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=False)
    assert (result.returncode == 0) is healthy, result.stderr


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regular expression."""
    parts = []
    for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
        if token in ("**", "**/"):
            parts.append("(?:.*/)?" if token == "**/" else ".*")
        elif token == "*":
            parts.append("[^/]*")
        elif token == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts))


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern that matches the
    path or one of its parent directories decides, `!` patterns put it back."""
    parents = [path.rsplit("/", depth)[0] for depth in range(path.count("/") + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = dockerignore_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(candidate) for candidate in parents):
            excluded = not negated
    return excluded


def dockerignore() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_matching() -> None:
    patterns = ["*", "!gateway", "**/__pycache__"]
    assert ignored(".venv/bin/python", patterns)
    assert not ignored("gateway/app.py", patterns)
    assert ignored("gateway/__pycache__/app.cpython-311.pyc", patterns)
    assert not ignored("gateway/app.py", ["*.py"])
    assert ignored("app.py", ["*.py"])


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_secret() -> None:
    patterns = dockerignore()
    build = stages(parse_dockerfile(DOCKERFILE.read_text()))[0]
    sources = [
        source
        for instruction in build
        if instruction.keyword == "COPY" and not instruction.arguments.startswith("--from")
        for source in instruction.arguments.split()[:-1]
    ]
    assert sorted(sources) == ["README.md", "constraints.txt", "gateway", "pyproject.toml"]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source, patterns), source
    assert not ignored("gateway/providers/ollama/__init__.py", patterns)
    for path in (
        ".git/config",
        ".venv/bin/python",
        ".env",
        "tests/deploy/test_dockerfile.py",
        "gateway/__pycache__/x.pyc",
    ):
        assert ignored(path, patterns), path
