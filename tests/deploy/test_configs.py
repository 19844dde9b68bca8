"""The example configs in config/: each passes the real `phoenix-gateway check-config` and is the
deployment its name promises (hybrid, local Ollama pool, vLLM), and no deployment file holds a
real-looking key.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import Config, ModelRoute, load_config
from tests.deploy.files import (
    COMPOSE,
    COMPOSE_GPU,
    CONFIGS,
    ENV_EXAMPLE,
    KUBERNETES,
    ROOT,
    check_config,
    env_example,
    key_variables,
)


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
    for name in ("OPENAI_API_KEY", "GEMINI_API_KEY", "VLLM_API_KEY"):
        assert env[name] == "", name
