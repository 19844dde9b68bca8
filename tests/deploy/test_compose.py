"""docker-compose.yml and docker-compose.gpu.yml: valid for the Compose Specification's schema
(vendored in tests/data; tests/data/README.md says where it comes from), with .env.example's values
and with the defaults, and in agreement with the image, the example config they mount, and the
Prometheus and Grafana files in deploy/.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from gateway.config import load_config
from tests.deploy.files import (
    COMPOSE,
    COMPOSE_GPU,
    COMPOSE_SCHEMA,
    CONFIG_IN_CONTAINER,
    GRAFANA,
    PROMETHEUS_CONFIG,
    ROOT,
    Instruction,
    check_config,
    env_example,
    key_variables,
    served_port,
)

OFFICIAL_IMAGES = {"prom/prometheus", "grafana/grafana", "ollama/ollama"}

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


def config_mount(env: dict[str, str] | None = None) -> tuple[str, str, str]:
    """The gateway's config path in the container (PHOENIX_CONFIG, else the image's), and the
    host source and container target of the bind mount that holds it."""
    gateway = compose(env=env)["services"]["gateway"]
    path = gateway.get("environment", {}).get("PHOENIX_CONFIG", CONFIG_IN_CONTAINER)
    (mount,) = [
        (source, target)
        for source, target, _ in volumes_of(gateway)
        if source.startswith(("./", "/")) and (path == target or path.startswith(target.rstrip("/") + "/"))
    ]
    return path, *mount


def compose_gateway_config(env: dict[str, str] | None = None) -> Path:
    """The config file that the compose file mounts where the gateway reads its config."""
    path, source, target = config_mount(env)
    return ROOT / source / Path(path).relative_to(target)


def test_the_config_directory_is_mounted_not_the_file_alone() -> None:
    """A bind-mounted file stays the inode the container started with: an edit saved as a new
    file (most editors, sed -i) would never reach a reload. The directory is mounted instead."""
    for env in (env_example(), {}):
        path, source, target = config_mount(env)
        assert path != target and (ROOT / source).is_dir(), (path, source, target)
        assert compose_gateway_config(env) == ROOT / "config" / "hybrid.yaml"
    other = compose_gateway_config({**env_example(), "GATEWAY_CONFIG": "vllm.yaml"})
    assert other == ROOT / "config" / "vllm.yaml"


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
