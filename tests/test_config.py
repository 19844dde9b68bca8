from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from gateway.auth import Keys
from gateway.cli import main, routing_table
from gateway.config import ConfigError, config_from_env, load_config, parse_config, resolve_config

MINIMAL: dict[str, Any] = {
    "backends": [{"name": "ollama-1", "type": "ollama", "base_url": "http://10.0.0.5:11434"}],
    "models": [{"name": "llama3.1", "deployments": [{"backend": "ollama-1", "model": "llama3.1:8b"}]}],
}

MODEL_ON_VLLM = {"name": "m", "deployments": [{"backend": "vllm"}]}

FULL = """
server: {host: 127.0.0.1, port: 8080, max_body_bytes: 10485760}
auth:
  keys:
    - {name: clinic-app, key_sha256: "KEYHASH", models: ["*"], privacy: private}
backends:
  - {name: ollama-1, type: ollama, base_url: "http://10.0.0.5:11434"}
  - {name: ollama-2, type: ollama, base_url: "http://10.0.0.6:11434", weight: 2}
  - {name: openai, type: openai, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
  - {name: vllm, type: openai, base_url: "http://10.0.0.7:8000/v1", local: true}
  - {name: gemini, type: gemini, api_key_env: GEMINI_API_KEY}
models:
  - name: llama3.1
    deployments: [{backend: ollama-1, model: "llama3.1:8b"}, {backend: ollama-2, model: "llama3.1:8b"}]
  - name: gpt-4o-mini
    deployments: [{backend: openai}]
    fallbacks: [llama3.1]
  - {name: "ollama/*", deployments: [{backend: ollama-1}, {backend: ollama-2}]}
routing:
  strategy: least_inflight
  affinity: prefix
  retries: 2
  health: {interval: 10, unhealthy_after: 3, cooldown: 30}
privacy: {header: x-privacy, detect_pii: true, local_model: llama3.1, audit_log: /var/lib/phoenix/audit.jsonl}
""".replace("KEYHASH", "a" * 64)


def test_the_design_example_validates_with_defaults_filled(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(FULL)
    config = load_config(path)
    assert [b.name for b in config.backends] == ["ollama-1", "ollama-2", "openai", "vllm", "gemini"]
    assert [b.local for b in config.backends] == [True, True, False, True, False]
    assert config.backend("gemini").base_url == "https://generativelanguage.googleapis.com/v1beta"
    assert config.backend("ollama-1").timeouts.first_token == 300


def test_unknown_keys_are_errors_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("backends: [{name: o, type: ollama, bse_url: 'http://x'}]\nmodels: []\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}: backends.0.ollama.bse_url: unknown key" in str(caught.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"backends": [{"name": "o", "type": "ollama", "base_url": "ftp://x"}]}, "must be an http(s) URL"),
        (  # not pydantic's "Input tag 'vllm' found using 'type' does not match any of ..."
            {"backends": [{"name": "o", "type": "vllm"}]},
            "test.yaml: backends.0.type: expected ollama, openai (any OpenAI-compatible server: vLLM,"
            " llama.cpp, LM Studio) or gemini, got 'vllm'",
        ),
        (  # not pydantic's "backends.0: Unable to extract tag using discriminator 'type'"
            {"backends": [{"name": "o", "base_url": "http://gpu-1:8000/v1"}]},
            "test.yaml: backends.0.type: required: ollama, openai (any OpenAI-compatible server: vLLM,"
            " llama.cpp, LM Studio) or gemini",
        ),
        ({"routing": {"strategy": "fastest"}}, "routing.strategy"),
        ({"models": [{"name": "m", "deployments": [{"backend": "nope"}]}]}, "unknown backend 'nope'"),
        (
            {"models": [{"name": "m", "deployments": [{"backend": "ollama-1"}], "fallbacks": ["x"]}]},
            "unknown model 'x'",
        ),
        ({"privacy": {"local_model": "ghost"}}, "privacy.local_model names unknown model 'ghost'"),
        (  # the upstream name would be cut wrong: `local/x/llama3.2` sent as `x/llama3`
            {"models": [{"name": "local/*/*", "deployments": [{"backend": "ollama-1"}]}]},
            "models.0.name: 'local/*/*': a pattern has one '*', whose match is the upstream model name",
        ),
        (  # an alias of a pattern was listed by check-config and reached nothing
            {"models": [{"name": "ollama/*", "aliases": ["o"], "deployments": [{"backend": "ollama-1"}]}]},
            "models.0.aliases: a pattern has no aliases",
        ),
        (  # a pattern as a fallback or local_model was asked for as `*`: 'run `ollama pull *`'
            {
                "models": [
                    {"name": "m", "deployments": [{"backend": "ollama-1"}], "fallbacks": ["ollama/*"]},
                    {"name": "ollama/*", "deployments": [{"backend": "ollama-1"}]},
                ]
            },
            "model 'm' falls back to 'ollama/*', a pattern: name one model",
        ),
        (
            {
                "models": [{"name": "*", "deployments": [{"backend": "ollama-1"}]}],
                "privacy": {"local_model": "*"},
            },
            "privacy.local_model names '*', a pattern: name one model",
        ),
        ({"server": {"port": 70000}}, "server.port"),
        ({"auth": {"keys": [{"name": "k"}]}}, "exactly one of 'key_sha256' or 'key_env'"),
        (
            {"backends": [{"name": "o", "type": "ollama", "base_url": "http://ops:s3cret@gpu-1:11434"}]},
            "backends.0.ollama.base_url: must not carry credentials",
        ),
        (  # the scheme forgotten: refused without the value
            {"backends": [{"name": "o", "type": "ollama", "base_url": "ops:s3cret@gpu-1:11434"}]},
            "backends.0.ollama.base_url: must be an http(s) URL",
        ),
        (
            {"backends": [{"name": "o", "type": "openai", "base_url": "https//gpu-1/v1?api_key=s3cret"}]},
            "backends.0.openai.base_url: must be an http(s) URL",
        ),
        (
            {"backends": [{"name": "o", "type": "ollama", "headers": {"Content-Length": "0"}}]},
            "backends.0.ollama.headers: 'Content-Length' is set by the gateway",
        ),
        (
            {"backends": [{"name": "o", "type": "ollama", "headers": {"x-team": "a\r\nx-evil: 1"}}]},
            "backends.0.ollama.headers: header 'x-team' is not a valid header line",
        ),
        (
            {"rate_limits": {"redis_url": "127.0.0.1:6379"}},
            "rate_limits.redis_url: not a Redis URL such as redis://host:6379/0 (no redis://, rediss://",
        ),
        (
            {"rate_limits": {"redis_url": "redis://:s3cret@cache:port/0"}},
            "rate_limits.redis_url: not a Redis URL such as redis://host:6379/0 (its port is not a whole",
        ),
    ],
)
def test_bad_values_are_errors_that_name_the_key(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**MINIMAL, **change}, "test.yaml")
    assert expected in str(caught.value)
    assert str(caught.value).startswith("test.yaml: ")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("base_url", "says"),
    [
        ("http://127.0.0.1:abc/v1", "its port is not a whole number from 1 to 65535"),
        ("http://127.0.0.1:99999/v1", "its port is not a whole number from 1 to 65535"),
        ("http://127.0.0.1:0/v1", "its port is not a whole number from 1 to 65535"),
        ("http://[::1:8000/v1", "its host is not a host name or address"),
        ("http://gpu\x01box:8000/v1", "its host is not a host name or address"),
        ("http://admin:Kq9vLr2Tz8Wm/4Xc=@127.0.0.1:8000/v1", "must not carry credentials"),
        ("http://admin:Kq9vLr2Tz8Wm?4Xc=@127.0.0.1:8000/v1", "must not carry credentials"),
    ],
)
def test_a_base_url_whose_host_or_port_does_not_parse_is_refused_naming_the_backend(
    base_url: str, says: str
) -> None:
    backend = {"name": "vllm", "type": "openai", "local": True, "base_url": base_url}
    with pytest.raises(ConfigError) as caught:
        parse_config({**MINIMAL, "backends": [backend], "models": [MODEL_ON_VLLM]}, "test.yaml")
    assert str(caught.value).startswith(f"test.yaml: backends.0.openai.base_url: {says}")
    assert str(caught.value).endswith("(backend 'vllm')")
    assert not shows_password(str(caught.value), "Kq9vLr2Tz8Wm/4Xc=")
    assert "abc" not in str(caught.value)


@pytest.mark.parametrize(
    "base_url", ["http://[::1]:8000/v1", "http://gpu-1:65535/v1", "https://api.openai.com/v1"]
)
def test_a_base_url_with_a_host_and_port_that_parse_is_taken(base_url: str) -> None:
    backend = {"name": "vllm", "type": "openai", "base_url": base_url}
    config = parse_config({**MINIMAL, "backends": [backend], "models": [MODEL_ON_VLLM]}, "test.yaml")
    assert config.backends[0].base_url == base_url


PASSWORDS = [
    "Kq9vLr2Tz8Wm/4Xc=",
    "Kq9vLr2Tz8Wm?4Xc=",
    "Kq9vLr2Tz8Wm#4Xc=",
    "12?Kq9vLr2Tz8Wm",
    "Kq9v/Lr2T@z8Wm",
]


def shows_password(text: str, password: str) -> bool:
    """Whether any four characters of `password` in a row appear in `text`."""
    return any(password[i : i + 4] in text for i in range(len(password) - 3))


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_redis_password_that_needs_percent_encoding_is_refused_and_never_printed(
    password: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: pytest.fail("serve started"))
    path = tmp_path / "gateway.yaml"
    redis_url = f"redis://default:{password}@10.0.0.9:6379/0"
    path.write_text(json.dumps({**MINIMAL, "rate_limits": {"redis_url": redis_url}}))
    assert main(["check-config", str(path)]) == 1
    assert main(["serve", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert err.count("rate_limits.redis_url: not a Redis URL") == 2
    assert "password, hidden here, holds '/', '?' or '#'" in err
    assert not shows_password(out + err, password)


def test_an_at_sign_in_a_redis_urls_query_must_be_percent_encoded_and_the_message_says_so() -> None:
    """An '@' after the host cannot be told from one that ends a password holding '/' or '?',
    which must never be printed: the refusal names both readings and the way out."""
    with pytest.raises(ConfigError, match="where it must be written %40"):
        parse_config({**MINIMAL, "rate_limits": {"redis_url": "redis://10.0.0.9/0?client_name=a@b"}}, "t")
    taken = "redis://10.0.0.9/0?client_name=a%40b"
    assert parse_config({**MINIMAL, "rate_limits": {"redis_url": taken}}, "t").rate_limits.redis_url == taken


def test_a_percent_encoded_redis_password_is_taken() -> None:
    redis_url = "redis://default:Kq9vLr2Tz8Wm%2F4Xc%3D@10.0.0.9:6379/0"
    config = parse_config({**MINIMAL, "rate_limits": {"redis_url": redis_url}}, "test.yaml")
    assert config.rate_limits.redis_url == redis_url


def test_duplicate_backend_names_are_refused() -> None:
    backends = MINIMAL["backends"] * 2
    with pytest.raises(ConfigError, match="duplicate backend name 'ollama-1'"):
        parse_config({**MINIMAL, "backends": backends}, "t")


SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        (
            [{"name": "app", "key_sha256": SHA_A}, {"name": "app", "key_sha256": SHA_B}],
            "duplicate auth key name 'app'",
        ),
        (
            [{"name": "app", "key_sha256": SHA_A}, {"name": "clinic", "key_sha256": SHA_A.upper()}],
            "duplicate auth key_sha256",
        ),
        ([{"name": "app", "key_env": "K"}, {"name": "clinic", "key_env": "K"}], "duplicate auth key_env 'K'"),
    ],
)
def test_two_keys_with_one_name_or_secret_are_refused(keys: list[dict[str, str]], says: str) -> None:
    # whichever came last would decide the shared secret's privacy policy and limits
    with pytest.raises(ConfigError, match=says):
        parse_config({**MINIMAL, "auth": {"keys": keys}}, "t")


def test_two_key_variables_holding_one_secret_are_refused() -> None:
    auth = parse_config(
        {**MINIMAL, "auth": {"keys": [{"name": "a", "key_env": "K"}, {"name": "b", "key_env": "L"}]}}, "t"
    ).auth
    with pytest.raises(ConfigError, match="key 'b' has the same secret as another key"):
        Keys(auth, {"K": "sk-same", "L": "sk-same"})


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("backends:\n  - {name: x\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (FULL + "auth: {}\n", "key 'auth' is given twice, at lines 3 and 25"),
        (
            FULL.replace("  retries: 2\n", "  retries: 2\n  retries: 0\n"),
            "key 'retries' is given twice, at lines 22 and 23",
        ),
        (
            "backends:\n  - {name: a, type: ollama, name: b}\nmodels: []\n",
            "key 'name' is given twice, at lines 2 and 2",
        ),
    ],
)
def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(
    text: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {says}"
    assert main(["check-config", str(path)]) == 1
    assert capsys.readouterr().err == f"error: {path}: {says}\n"


def test_a_yaml_merge_may_still_override_what_it_merges(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "backends:\n  - &ollama {name: a, type: ollama, weight: 2}\n  - {<<: *ollama, name: b}\n"
        "models: [{name: m, deployments: [{backend: a}, {backend: b}]}]\n"
    )
    assert [(b.name, b.weight) for b in load_config(path).backends] == [("a", 2), ("b", 2)]


def test_a_file_that_is_not_utf8_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# configuración\nbackends: []\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: not UTF-8 text (byte 13)"


def test_environment_default_is_ollama_on_localhost() -> None:
    config = config_from_env({})
    assert [(b.name, b.base_url, b.local) for b in config.backends] == [
        ("ollama", "http://localhost:11434", True)
    ]
    assert [m.name for m in config.models] == ["ollama/*", "*"]


def test_several_ollama_urls_make_a_pool_and_ollama_model_is_the_default_alias() -> None:
    config = config_from_env({"OLLAMA_BASE_URL": "http://a:1, http://b:2", "OLLAMA_MODEL": "llama3.2"})
    assert [b.name for b in config.backends] == ["ollama-1", "ollama-2"]
    default = config.models[0]
    assert default.name == "default"
    assert [(d.backend, d.model) for d in default.deployments] == [
        ("ollama-1", "llama3.2"),
        ("ollama-2", "llama3.2"),
    ]


def test_llm_provider_picks_the_backend_for_bare_names() -> None:
    config = config_from_env({"OPENAI_API_KEY": "sk-x", "LLM_PROVIDER": "openai"})
    catch_all = config.models[-1]
    assert catch_all.name == "*"
    assert [d.backend for d in catch_all.deployments] == ["openai"]
    assert config.backend("openai").local is False


def test_llm_provider_without_its_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="GEMINI_API_KEY is not set"):
        config_from_env({"LLM_PROVIDER": "gemini"})


def test_a_base_url_without_its_scheme_in_the_environment_is_not_echoed() -> None:
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL: must be an http") as caught:
        config_from_env({"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "ops:s3cret@gpu-1/v1"})
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"OLLAMA_BASE_URL": "localhost:11434"},
            "environment: OLLAMA_BASE_URL: must be an http(s) URL: http:// or https://, then the host"
            " (backend 'ollama')",
        ),
        (
            {"OLLAMA_BASE_URL": "http://a:1, b:2"},
            "environment: OLLAMA_BASE_URL: must be an http(s) URL: http:// or https://, then the host"
            " (backend 'ollama-2')",
        ),
        (
            {"OLLAMA_BASE_URL": " , ,"},
            "environment: OLLAMA_BASE_URL: no URL in ', ,'; give one, or several separated by commas",
        ),
        (
            {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "api.openai.com/v1"},
            "environment: OPENAI_BASE_URL: must be an http(s) URL: http:// or https://, then the host"
            " (backend 'openai')",
        ),
    ],
)
def test_a_bad_url_in_the_environment_is_named_by_its_variable(environ: dict[str, str], message: str) -> None:
    """Not by the config key built from it (`backends.0.ollama.base_url`), which the operator never
    wrote, nor, for a variable without a URL, as 'backends: List should have at least 1 item'."""
    with pytest.raises(ConfigError) as caught:
        config_from_env(environ)
    assert str(caught.value) == message


def test_an_empty_ollama_base_url_is_the_default_as_in_the_library() -> None:
    """`OLLAMA_BASE_URL=` (compose and `docker run -e` pass variables set but empty): Ollama on
    localhost, as when it is not set, and as `LLMProviderFactory.create_from_env` reads it."""
    config = config_from_env({"OLLAMA_BASE_URL": " "})
    assert [(b.name, b.base_url) for b in config.backends] == [("ollama", "http://localhost:11434")]


def test_phoenix_config_is_used_only_when_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(FULL)
    assert len(resolve_config(None, {"PHOENIX_CONFIG": str(path)}).backends) == 5
    assert len(resolve_config(None, {}).backends) == 1


def test_routing_table_lists_each_deployment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(FULL)
    table = routing_table(load_config(path))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "ALIASES", "BACKEND"]
    assert any(
        line.split()[:3] == ["gpt-4o-mini", "openai", "openai"] and "llama3.1" in line for line in lines
    )
    assert any("ollama/*" in line and "(as requested)" in line for line in lines)


def test_check_config_command_prints_table_or_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(FULL)
    assert main(["check-config", str(good)]) == 0
    assert "llama3.1:8b" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends: []\nmodels: []\n")
    assert main(["check-config", str(bad)]) == 1
    assert f"error: {bad}: backends: List should have at least 1 item" in capsys.readouterr().err


def test_commands_other_than_serve_put_back_the_sighup_handler_the_launcher_held_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(FULL)

    def handler(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as gateway.__main__ leaves it
    try:
        assert main(["check-config", str(path)], hangup=handler) == 0
        assert signal.getsignal(signal.SIGHUP) is handler
    finally:
        signal.signal(signal.SIGHUP, before)
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("backend", "local"),
    [
        ({"base_url": "http://10.0.0.5:11434"}, True),
        ({"base_url": "https://ollama.com"}, False),  # Ollama's hosted API: off the premises
        ({"base_url": "https://API.Ollama.com/"}, False),
        ({"base_url": "https://ollama.com./"}, False),  # the same host, written fully qualified
        ({"base_url": "https://ollama.com", "local": True}, True),  # the operator's word stands
        ({"base_url": "https://notollama.com"}, True),
    ],
)
def test_an_ollama_backend_is_local_unless_it_is_ollama_s_hosted_api(
    backend: dict[str, Any], local: bool
) -> None:
    config = parse_config(
        {
            "backends": [{"name": "o", "type": "ollama", **backend}],
            "models": [{"name": "m", "deployments": [{"backend": "o"}]}],
        },
        "test",
    )
    assert config.backends[0].local is local
