"""The deployment files: the Dockerfile, docker-compose.yml, deploy/kubernetes and the example
configs in config/. Nothing here needs Docker, a cluster or the network: every file is parsed and
checked against what the gateway and the other files say, the configs by the real
`phoenix-gateway check-config`, the manifests by the Kubernetes schemas bundled in
kubernetes-validate, the compose files by the Compose Specification's schema vendored in
tests/data (tests/data/README.md says where it comes from).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.cli import parser
from gateway.config import Config, ModelRoute, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
KUBERNETES = ROOT / "deploy" / "kubernetes"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))

# Kinds served by operators' CRDs: no schema in kubernetes-validate, checked structurally below.
CUSTOM_KINDS = {"ServiceMonitor", "Kustomization"}
# The oldest Kubernetes release the manifests are meant for, and the newest schemas bundled.
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
OFFICIAL_IMAGES = {"prom/prometheus", "grafana/grafana", "ollama/ollama"}
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


# --- config/ -------------------------------------------------------------------------------------


def test_the_three_config_examples_exist() -> None:
    assert [path.name for path in CONFIGS] == ["hybrid.yaml", "local-ollama-pool.yaml", "vllm.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_example_passes_check_config(path: Path) -> None:
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    config = load_config(path)
    assert f"{path}: OK ({len(config.backends)} backends, {len(config.models)} models)" in result.stdout
    for route in config.models:
        assert route.name in result.stdout


def test_check_config_rejects_a_broken_example(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / "config" / "hybrid.yaml").read_text().replace("base_url:", "bse_url:", 1))
    result = check_config(broken)
    assert result.returncode == 1
    assert "backends.0.ollama.bse_url: unknown key" in result.stderr


def local_backends(config: Config) -> set[str]:
    return {backend.name for backend in config.backends if backend.local}


def test_hybrid_keeps_private_traffic_local_and_falls_back_in_public() -> None:
    config = load_config(ROOT / "config" / "hybrid.yaml")
    routes = {route.name: route for route in config.models}
    local = local_backends(config)
    assert config.privacy.detect_pii
    assert config.privacy.local_model is not None
    local_model = routes[config.privacy.local_model]
    assert len(local_model.deployments) >= 2
    assert served_by(local_model) <= local
    cloud_chat = [
        route
        for route in config.models
        if not (route.is_pattern or "embed" in route.name or served_by(route) <= local)
    ]
    assert {route.name for route in cloud_chat} == {"gpt-4o-mini", "gemini-2.5-flash"}
    for route in cloud_chat:
        assert route.fallbacks[-1] == config.privacy.local_model, route.name
    assert {backend.type for backend in config.backends} == {"ollama", "openai", "gemini"}
    assert key_variables(ROOT / "config" / "hybrid.yaml") == {"OPENAI_API_KEY", "GEMINI_API_KEY"}


def served_by(route: ModelRoute) -> set[str]:
    return {deployment.backend for deployment in route.deployments}


def test_local_ollama_pool_has_only_local_ollama_backends() -> None:
    config = load_config(ROOT / "config" / "local-ollama-pool.yaml")
    assert len(config.backends) >= 2
    assert all(backend.type == "ollama" and backend.local for backend in config.backends)
    for route in config.models:
        assert served_by(route) == local_backends(config)


def test_vllm_example_is_a_local_openai_compatible_pool() -> None:
    config = load_config(ROOT / "config" / "vllm.yaml")
    assert len(config.backends) >= 2
    for backend in config.backends:
        assert (backend.type, backend.local) == ("openai", True)
        assert backend.base_url.endswith("/v1")
    (route,) = config.models
    assert served_by(route) == local_backends(config)


SECRET_LOOKING = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}|\bAIza[0-9A-Za-z_-]{30,}")


def test_no_file_holds_a_real_looking_key() -> None:
    files = [*CONFIGS, COMPOSE, COMPOSE_GPU, ENV_EXAMPLE, *KUBERNETES.rglob("*.yaml")]
    for path in files:
        assert not SECRET_LOOKING.search(path.read_text()), path
    env = env_example()
    for name in ("OPENAI_API_KEY", "GEMINI_API_KEY"):
        assert env[name] == "", name


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


@pytest.fixture(scope="module")
def image() -> list[Instruction]:
    """The runtime (last) stage of the Dockerfile."""
    return stages(parse_dockerfile(DOCKERFILE.read_text()))[-1]


def served_argv(image: list[Instruction]) -> list[str]:
    return only(image, "ENTRYPOINT").exec_form() + only(image, "CMD").exec_form()


def served_port(image: list[Instruction]) -> int:
    port: int = parser().parse_args(served_argv(image)[1:]).port
    return port


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
    assert "pip install ." in runs
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
    assert 'phoenix-gateway = "gateway.cli:main"' in scripts


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
    assert sorted(sources) == ["README.md", "gateway", "pyproject.toml"]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source, patterns), source
    assert not ignored("gateway/providers/ollama.py", patterns)
    for path in (
        ".git/config",
        ".venv/bin/python",
        ".env",
        "tests/test_deploy.py",
        "gateway/__pycache__/x.pyc",
    ):
        assert ignored(path, patterns), path


# --- docker-compose.yml ------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=VALUE: {line!r}"
            env[name.strip()] = value.strip()
    return env


VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}|\$(\w+)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation, in every string value: `${NAME}`, `${NAME:-default}`,
    `${NAME-default}`, `$NAME`, and `$$` for a literal dollar."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3) or ""
        if operator == ":-" and not env.get(name):
            return default
        if operator == "-" and name not in env:
            return default
        return env.get(name, "")

    return VARIABLE.sub(substitute, value)


def compose(path: Path = COMPOSE, env: dict[str, str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = interpolate(
        yaml.safe_load(path.read_text()), env_example() if env is None else env
    )
    return data


def compose_validator() -> jsonschema.protocols.Validator:
    # The schema says draft 2019-09 in a form jsonschema does not recognise by itself.
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    validator: jsonschema.protocols.Validator = jsonschema.Draft201909Validator(schema)
    return validator


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert (
        interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${UNSET} $SET $$SET", env)
        == "x d  d  x $SET"
    )
    assert interpolate({"a": ["${SET}"], "b": 1}, env) == {"a": ["x"], "b": 1}


def test_every_compose_variable_is_in_env_example() -> None:
    used = set()
    for path in (COMPOSE, COMPOSE_GPU):
        used |= {m.group(1) or m.group(4) for m in VARIABLE.finditer(path.read_text()) if m.group(0) != "$$"}
    assert used <= set(env_example()), sorted(used - set(env_example()))


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda path: path.name)
@pytest.mark.parametrize("source", ["env-example", "defaults"])
def test_compose_file_matches_the_compose_specification(path: Path, source: str) -> None:
    data = compose(path, env_example() if source == "env-example" else {})
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in compose_validator().iter_errors(data)]
    assert not errors, "\n".join(errors)


def test_compose_schema_rejects_a_wrong_service() -> None:
    data = compose()
    data["services"]["gateway"]["restart_policy"] = "always"
    data["services"]["prometheus"]["ports"] = 9090
    messages = [error.message for error in compose_validator().iter_errors(data)]
    assert any("restart_policy" in message for message in messages), messages
    assert any("9090 is not of type 'array'" in message for message in messages), messages


def test_gateway_is_built_from_the_repository_and_the_rest_are_official_images() -> None:
    services = compose()["services"]
    gateway = services.pop("gateway")
    assert gateway["build"] == "."
    assert "image" not in gateway
    for name, service in services.items():
        assert "build" not in service, name
        repository, _, tag = service["image"].partition(":")
        assert repository in OFFICIAL_IMAGES, name
        assert re.fullmatch(r"\w[\w.-]*", tag), f"{name}: name the tag"


def volumes_of(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of a service's short-syntax volumes."""
    result = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        result.append((source, target, mode[0] if mode else "rw"))
    return result


def test_every_bind_mount_exists_and_named_volumes_are_declared() -> None:
    data = compose()
    declared = set(data["volumes"])
    used = set()
    for name, service in data["services"].items():
        for source, target, mode in volumes_of(service):
            assert target.startswith("/"), (name, target)
            if source.startswith(("./", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
                assert mode == "ro", f"{name}: mount {source} read-only"
            else:
                assert source in declared, (name, source)
                used.add(source)
    assert used == declared


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of a service's short-syntax ports."""
    result = []
    for port in service.get("ports", []):
        address, host, container = port.split(":")
        result.append((address, int(host), int(container)))
    return result


def test_ports_are_published_on_loopback_by_default_and_match_what_listens(image: list[Instruction]) -> None:
    services = compose(env={})["services"]
    listening = {"gateway": served_port(image), "prometheus": 9090, "grafana": 3000}
    for name, port in listening.items():
        assert published(services[name]) == [("127.0.0.1", port, port)], name
    assert not any(published(services[name]) for name in services if name.startswith("ollama"))
    ports = compose()["services"]
    assert [published(ports[name])[0][1] for name in listening] == [
        int(env_example()[variable]) for variable in ("GATEWAY_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT")
    ]


def compose_gateway_config(env: dict[str, str] | None = None) -> Path:
    """The config file that the compose file mounts where the image reads its config."""
    gateway = compose(env=env)["services"]["gateway"]
    return ROOT / {target: source for source, target, _ in volumes_of(gateway)}[CONFIG_IN_CONTAINER]


def test_gateway_service_mounts_a_config_that_passes_check_config() -> None:
    config = compose_gateway_config()
    assert config == compose_gateway_config(env={}) == ROOT / "config" / "hybrid.yaml"
    result = check_config(config)
    assert result.returncode == 0, result.stderr
    gateway = compose()["services"]["gateway"]
    assert gateway["read_only"] is True
    assert set(gateway["environment"]) >= key_variables(config)


def test_compose_waits_for_the_gateway_to_drain_before_killing_it() -> None:
    gateway = compose()["services"]["gateway"]
    config = load_config(compose_gateway_config())
    grace = re.fullmatch(r"(\d+)s", gateway["stop_grace_period"])
    assert grace and int(grace.group(1)) > config.server.shutdown_timeout


def test_gateway_audit_file_is_on_a_volume() -> None:
    gateway = compose()["services"]["gateway"]
    config = load_config(compose_gateway_config())
    assert config.privacy.audit_log is not None
    targets = {target for source, target, _ in volumes_of(gateway) if not source.startswith(".")}
    assert str(Path(config.privacy.audit_log).parent) in targets


def ollama_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service for name, service in data["services"].items() if "ollama" in service.get("image", "")
    }


def test_ollama_pool_runs_under_its_profile_without_cloud_models() -> None:
    data = compose()
    pool = ollama_services(data)
    assert len(pool) >= 2
    model_volumes = set()
    for name, service in pool.items():
        assert service["profiles"] == ["ollama"], name
        assert service["environment"]["OLLAMA_NO_CLOUD"] == "1", name
        ((source, target, _),) = volumes_of(service)
        assert target == "/root/.ollama" and source in data["volumes"], name
        model_volumes.add(source)
    assert len(model_volumes) == len(pool), "each instance keeps its own models"
    others = [service for name, service in data["services"].items() if name not in pool]
    assert not any("profiles" in service for service in others), "the gateway and monitoring always start"


def test_compose_gateway_config_balances_over_every_ollama_service() -> None:
    data = compose()
    config = load_config(compose_gateway_config())
    ollama = [backend for backend in config.backends if backend.type == "ollama"]
    hosts = {urlsplit(backend.base_url).hostname: urlsplit(backend.base_url).port for backend in ollama}
    assert hosts == dict.fromkeys(ollama_services(data), 11434)
    pooled = [route for route in config.models if len(route.deployments) == len(ollama) >= 2]
    assert pooled, "a model served by the pool"


def test_gpu_override_reserves_nvidia_gpus_for_each_ollama_instance() -> None:
    gpu = compose(COMPOSE_GPU)["services"]
    assert set(gpu) == set(ollama_services(compose()))
    for name, service in gpu.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert device["count"] == "all", name


def test_prometheus_scrapes_the_gateway_service_and_loads_the_alerts(image: list[Instruction]) -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    mounts = {target: source for source, target, _ in volumes_of(prometheus)}
    directory = mounts[str(Path(config_file).parent)]
    assert (ROOT / directory / Path(config_file).name).resolve() == PROMETHEUS_CONFIG
    assert (ROOT / directory / "alerts.yml").is_file()
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    targets = [target for job in scrape for config in job["static_configs"] for target in config["targets"]]
    assert targets == [f"gateway:{served_port(image)}"]
    assert "gateway" in services


def test_grafana_is_provisioned_with_the_prometheus_service_and_the_dashboard() -> None:
    services = compose()["services"]
    mounts = {target: (ROOT / source).resolve() for source, target, _ in volumes_of(services["grafana"])}
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "phoenix-gateway.yml").read_text())
    assert mounts[providers["providers"][0]["options"]["path"]] == GRAFANA / "dashboards"
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    url = urlsplit(sources["datasources"][0]["url"])
    assert url.hostname in services
    assert published(services[url.hostname])[0][2] == url.port


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


def gateway_config_from_configmap(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(manifest("ConfigMap")["data"]["gateway.yaml"])
    return path


def container() -> dict[str, Any]:
    (found,) = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    return found


def standard_documents() -> list[Any]:
    """The manifests of built-in kinds, as pytest parameters named `FILE:KIND`."""
    return [
        pytest.param(document, id=f"{path.relative_to(KUBERNETES)}:{document['kind']}")
        for path, document in kubernetes_documents()
        if document["kind"] not in CUSTOM_KINDS
    ]


def test_kubernetes_manifests_cover_the_deployment() -> None:
    kinds = sorted(document["kind"] for _, document in kubernetes_documents())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Kustomization",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceMonitor",
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("document", standard_documents())
def test_manifest_validates_against_the_kubernetes_schema(document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


def test_kubernetes_validation_catches_mistakes() -> None:
    deployment = manifest("Deployment")
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(deployment, "1.30", strict=True)
    service = manifest("Service")
    service["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, "1.30", strict=True)


def test_configmap_config_passes_check_config(tmp_path: Path) -> None:
    result = check_config(gateway_config_from_configmap(tmp_path))
    assert result.returncode == 0, result.stderr


def test_probes_ports_and_config_agree(tmp_path: Path, image: list[Instruction]) -> None:
    spec = container()
    (port,) = spec["ports"]
    config = load_config(gateway_config_from_configmap(tmp_path))
    assert port["containerPort"] == served_port(image) == config.server.port
    assert spec.get("command") is None and spec.get("args") is None, "the image's command serves"
    assert spec["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    (service_port,) = manifest("Service")["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    assert service_port["port"] == config.server.port


def test_config_is_mounted_where_phoenix_config_points() -> None:
    deployment = manifest("Deployment")
    spec = container()
    env = {item["name"]: item for item in spec["env"]}
    config_path = Path(env["PHOENIX_CONFIG"]["value"])
    mounts = {mount["name"]: mount for mount in spec["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    (name,) = [name for name, volume in volumes.items() if "configMap" in volume]
    assert mounts[name]["mountPath"] == str(config_path.parent) and mounts[name]["readOnly"]
    configmap = volumes[name]["configMap"]
    assert configmap["name"] == manifest("ConfigMap")["metadata"]["name"]
    assert configmap["items"] == [{"key": "gateway.yaml", "path": config_path.name}]


def test_provider_keys_come_from_the_secret(tmp_path: Path) -> None:
    env = {item["name"]: item for item in container()["env"]}
    secret = manifest("Secret")
    needed = key_variables(gateway_config_from_configmap(tmp_path))
    assert needed == {"OPENAI_API_KEY", "GEMINI_API_KEY"}
    for name in needed:
        reference = env[name]["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret["metadata"]["name"], name
        assert reference["key"] in secret["stringData"], name
        assert reference["optional"] is True, name
    assert all(value.startswith("replace-with-") for value in secret["stringData"].values())


def test_pods_are_replicated_limited_and_locked_down() -> None:
    deployment = manifest("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    spec = container()
    assert set(spec["resources"]["requests"]) == set(spec["resources"]["limits"]) == {"cpu", "memory"}
    security = spec["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    writable = {mount["mountPath"] for mount in spec["volumeMounts"] if not mount.get("readOnly")}
    assert writable == {"/tmp"}


def test_pods_get_time_to_drain(tmp_path: Path) -> None:
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    config = load_config(gateway_config_from_configmap(tmp_path))
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + config.server.shutdown_timeout


def test_service_pdb_and_hpa_select_the_gateway_pods() -> None:
    deployment = manifest("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert manifest("Service")["spec"]["selector"].items() <= labels.items()
    pdb = manifest("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = manifest("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert pdb["minAvailable"] < hpa["minReplicas"] == deployment["spec"]["replicas"] < hpa["maxReplicas"]


def test_servicemonitor_scrapes_the_service_metrics_port() -> None:
    """A Prometheus Operator CRD, outside the Kubernetes schemas: checked field by field."""
    monitor = manifest("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
    service = manifest("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    scrape_interval = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert endpoint["interval"] == scrape_interval


def test_kustomization_applies_every_manifest_but_the_secret_and_the_servicemonitor() -> None:
    kustomization = manifest("Kustomization")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    resources = kustomization["resources"]
    on_disk = {path.name for path in KUBERNETES.glob("*.yaml")} - {
        "kustomization.yaml",
        "servicemonitor.yaml",
    }
    assert sorted(resources) == sorted(on_disk)
    kinds = {document["kind"] for path, document in kubernetes_documents() if path.name in resources}
    assert "Secret" not in kinds, "applying the kustomization must never overwrite real keys"
