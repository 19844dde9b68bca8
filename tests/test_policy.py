"""Routing decisions without I/O: API keys, privacy classification, and which targets count as local."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from gateway.auth import Keys, allows, check_model
from gateway.config import ApiKey, Auth, ConfigError, Privacy, parse_config
from gateway.errors import (
    AuthenticationFailed,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    UpstreamUnavailable,
)
from gateway.policy import CLOUD, LOCAL, MISSING, UNKNOWN, Plan, Router, Target, local_only, locality
from gateway.privacy import classify
from gateway.schemas import ModelInfo


def key(name: str, secret: str, **extra: Any) -> ApiKey:
    return ApiKey(name=name, key_sha256=hashlib.sha256(secret.encode()).hexdigest(), **extra)


# ---- API keys ----


def test_keys_identify_the_caller_by_hash_or_environment() -> None:
    keys = Keys(
        Auth(keys=[key("app", "sk-one"), ApiKey(name="ops", key_env="OPS_KEY", models=["llama*"])]),
        {"OPS_KEY": "sk-two"},
    )
    assert not keys.open
    app, ops = keys.identify("Bearer sk-one"), keys.identify("bearer  sk-two ")
    assert app is not None and app.name == "app"
    assert ops is not None and ops.name == "ops"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "Missing API key"),
        ("", "Missing API key"),
        ("Basic c2stb25l", "Missing API key"),
        ("Bearer ", "Missing API key"),
        ("Bearer sk-one-but-longer", "Incorrect API key"),
        ("Bearer SK-ONE", "Incorrect API key"),
    ],
)
def test_a_missing_or_wrong_key_is_a_401(header: str | None, message: str) -> None:
    keys = Keys(Auth(keys=[key("app", "sk-one")]), {})
    with pytest.raises(AuthenticationFailed, match=message) as caught:
        keys.identify(header)
    assert caught.value.http_status == 401
    assert "sk-one" not in caught.value.message


def test_no_keys_means_an_open_gateway() -> None:
    keys = Keys(Auth(), {})
    assert keys.open
    assert keys.identify(None) is None
    assert keys.identify("Bearer anything") is None


def test_a_key_whose_environment_variable_is_unset_stops_the_start() -> None:
    with pytest.raises(ConfigError, match=r"'ops'.*\$OPS_KEY"):
        Keys(Auth(keys=[ApiKey(name="ops", key_env="OPS_KEY")]), {})


def test_model_allow_lists_are_globs() -> None:
    limited = key("app", "s", models=["llama*", "ollama/*"])
    assert allows(limited, "llama3.2") and allows(limited, "ollama/qwen2.5:0.5b")
    assert not allows(limited, "gpt-4o")
    assert allows(None, "gpt-4o")
    with pytest.raises(PermissionDenied) as caught:
        check_model(limited, "gpt-4o")
    assert (caught.value.http_status, caught.value.code, caught.value.param) == (
        403,
        "model_not_allowed",
        "model",
    )


@pytest.mark.parametrize(
    ("allowed", "asked", "taken"),
    [
        ("llama3.2", "llama3.2:latest", True),  # as /v1/models lists it
        ("llama3.2:latest", "llama3.2", True),  # as a client may ask for it
        ("llama3.2", "llama3.2:1b", False),  # another tag is another model
        ("llama3.2:1b", "llama3.2", False),
        ("gpt-4o", "gpt-4o-mini", False),
    ],
)
def test_an_allowed_ollama_name_and_its_latest_tag_are_one_model(
    allowed: str, asked: str, taken: bool
) -> None:
    assert allows(key("app", "s", models=[allowed]), asked) is taken


# ---- privacy classification ----


def decide(headers: dict[str, str] | None = None, metadata: dict[str, Any] | None = None, **kw: Any) -> Any:
    texts = kw.pop("texts", ["nothing personal here"])
    return classify(
        kw.pop("settings", Privacy()),
        headers or {},
        metadata=metadata,
        key=kw.pop("key", None),
        model_policy=kw.pop("model_policy", None),
        texts=lambda: texts,
    )


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"headers": {"x-privacy": "private"}}, "header"),
        ({"headers": {"x-privacy": " PRIVATE "}}, "header"),
        ({"metadata": {"privacy": "private"}}, "metadata"),
        ({"key": key("clinic", "s", privacy="private")}, "key"),
        ({"model_policy": "private"}, "model"),
        ({"texts": ["write to ana.lopez@example.org"]}, "pii:email"),
        # the first source in order is the reason; an explicit "public" never wins over another source
        ({"headers": {"x-privacy": "public"}, "model_policy": "private"}, "model"),
        ({"headers": {"x-privacy": "private"}, "texts": ["ana@example.org"]}, "header"),
        ({"metadata": {"privacy": "public"}, "texts": ["ana@example.org"]}, "pii:email"),
    ],
)
def test_any_source_makes_a_request_private(kwargs: dict[str, Any], reason: str) -> None:
    decision = decide(**kwargs)
    assert decision.private
    assert decision.reason == reason
    assert decision.header == f"private;reason={reason}"


def test_token_ids_the_detector_cannot_read_make_a_request_private() -> None:
    def ids(given: bool) -> Any:
        return lambda: given

    settings = Privacy()
    kw: dict[str, Any] = {"metadata": None, "key": None, "model_policy": None, "texts": lambda: ["fine"]}
    assert classify(settings, {}, token_ids=ids(True), **kw).reason == "token_ids"
    assert not classify(settings, {}, token_ids=ids(False), **kw).private
    # a source stated before it stays the reason; without the detector, ids are not looked at
    assert classify(settings, {"x-privacy": "private"}, token_ids=ids(True), **kw).reason == "header"
    assert not classify(Privacy(detect_pii=False), {}, token_ids=ids(True), **kw).private


def test_without_a_source_a_request_is_public() -> None:
    decision = decide(headers={"x-privacy": "public"})
    assert not decision.private
    assert decision.header == "public"


@pytest.mark.parametrize("value", ["public, private", "private,public", " public ,PRIVATE"])
def test_a_header_with_several_values_is_private_if_any_is(value: str) -> None:
    assert decide(headers={"x-privacy": value}).reason == "header"


def test_a_header_with_several_values_must_have_a_level_in_each() -> None:
    with pytest.raises(InvalidRequest) as caught:
        decide(headers={"x-privacy": "public, banana"})
    assert caught.value.param == "x-privacy"


def test_the_detector_can_be_switched_off_and_the_header_renamed() -> None:
    assert Privacy(header="X-Data-Class").header == "x-data-class"  # names arrive lower-case
    settings = Privacy(header="X-Data-Class", detect_pii=False)
    assert not decide(texts=["ana@example.org"], settings=settings).private
    assert decide(headers={"x-data-class": "private"}, settings=settings).reason == "header"
    assert not decide(headers={"x-privacy": "private"}, settings=settings).private


def test_the_detector_is_not_run_when_another_source_already_decided() -> None:
    def texts() -> list[str]:
        raise AssertionError("scanned needlessly")

    assert classify(
        Privacy(), {"x-privacy": "private"}, metadata=None, key=None, model_policy=None, texts=texts
    )


@pytest.mark.parametrize(
    ("headers", "metadata", "param"),
    [({"x-privacy": "secret"}, None, "x-privacy"), ({}, {"privacy": "internal"}, "metadata.privacy")],
)
def test_a_tag_that_is_neither_value_is_a_400_naming_it(
    headers: dict[str, str], metadata: dict[str, Any] | None, param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decide(headers=headers, metadata=metadata)
    assert caught.value.param == param


# ---- locality ----

CONFIG = parse_config(
    {
        "backends": [
            {"name": "ollama-1", "type": "ollama"},
            {"name": "vllm", "type": "openai", "base_url": "http://10.0.0.7:8000/v1", "local": True},
            {"name": "openai", "type": "openai"},
            {"name": "office-ollama", "type": "ollama", "base_url": "http://10.0.0.9:11434", "local": False},
        ],
        "models": [{"name": "*", "deployments": [{"backend": "ollama-1"}]}],
    },
    "test",
)
LISTING = [ModelInfo("llama3.2:latest"), ModelInfo("gpt-oss:20b"), ModelInfo("mine:latest", remote=True)]


@pytest.mark.parametrize(
    ("backend", "model", "listing", "expected"),
    [
        ("ollama-1", "llama3.2", LISTING, LOCAL),
        ("ollama-1", "llama3.2:latest", LISTING, LOCAL),
        ("ollama-1", "gpt-oss:20b", LISTING, LOCAL),
        ("ollama-1", "gpt-oss:120b-cloud", LISTING, CLOUD),  # by name, even when unlisted
        ("ollama-1", "kimi-k2:cloud", None, CLOUD),
        ("ollama-1", "mine", LISTING, CLOUD),  # an alias of a cloud model: the inventory says remote
        ("ollama-1", "qwen2.5:0.5b", LISTING, MISSING),
        ("ollama-1", "llama3.2", None, UNKNOWN),  # could not ask: locality not established
        ("vllm", "anything", None, LOCAL),
        ("openai", "gpt-4o", None, CLOUD),
        ("office-ollama", "llama3.2", LISTING, CLOUD),
    ],
)
def test_locality_is_established_or_refused(
    backend: str, model: str, listing: list[ModelInfo] | None, expected: str
) -> None:
    assert locality(CONFIG.backend(backend), model, listing) == expected


def plan_of(*targets: Target) -> Plan:
    return Plan("m", "m", "m", targets, fallbacks=("other",))


A, B, C = Target("ollama-1", "a"), Target("ollama-2", "a"), Target("openai", "a")


def test_a_private_plan_keeps_local_targets_and_drops_fallbacks() -> None:
    local = local_only(plan_of(A, B, C), {A: UNKNOWN, B: LOCAL, C: CLOUD})
    assert local is not None
    assert local.targets == (B,)
    assert local.fallbacks == ()


def test_no_reachable_local_target_is_a_503_naming_the_instances() -> None:
    with pytest.raises(UpstreamUnavailable, match="ollama-1, ollama-2"):
        local_only(plan_of(A, B, C), {A: UNKNOWN, B: UNKNOWN, C: CLOUD})


def test_a_model_missing_locally_is_a_404_with_the_pull_hint() -> None:
    with pytest.raises(ModelNotFound, match="ollama pull a"):
        local_only(plan_of(A, C), {A: MISSING, C: CLOUD})


def test_a_cloud_only_plan_has_no_local_version() -> None:
    assert local_only(plan_of(C), {C: CLOUD}) is None


def test_plans_carry_the_routes_privacy_policy() -> None:
    config = parse_config(
        {
            "backends": [{"name": "ollama-1", "type": "ollama"}],
            "models": [
                {"name": "notes", "deployments": [{"backend": "ollama-1"}], "privacy": "private"},
                {"name": "ollama/*", "deployments": [{"backend": "ollama-1"}]},
            ],
        },
        "test",
    )
    router = Router(config)
    assert router.plan("notes").privacy == "private"
    assert router.plan("ollama/llama3.2").privacy is None


def test_a_404_suggests_only_names_a_request_can_use() -> None:
    backends = [{"name": "ollama-1", "type": "ollama", "base_url": "http://127.0.0.1:9"}]
    exact = {"name": "llama3.2", "deployments": [{"backend": "ollama-1", "model": "llama3.2:latest"}]}
    router = Router(parse_config({"backends": backends, "models": [exact]}, "test"))
    router.learn("ollama-1", ["llama3.2:latest"])  # what the instance lists is not a gateway name
    with pytest.raises(ModelNotFound) as refused:
        router.plan("llama3.2:latest")
    assert refused.value.message.endswith("Did you mean: llama3.2?")

    pattern = {"name": "ollama/*", "deployments": [{"backend": "ollama-1"}]}
    router = Router(parse_config({"backends": backends, "models": [exact, pattern]}, "test"))
    router.learn("ollama-1", ["llama3.2:latest"])
    with pytest.raises(ModelNotFound) as refused:
        router.plan("llama3.2:lates")
    assert refused.value.message.endswith("Did you mean: ollama/llama3.2:latest, llama3.2, ollama/llama3.2?")
    assert router.plan("ollama/llama3.2:latest").targets == (Target("ollama-1", "llama3.2:latest"),)


def test_a_404_suggests_a_pattern_only_the_names_its_own_backends_list() -> None:
    backends = [
        {"name": "ollama-1", "type": "ollama", "base_url": "http://127.0.0.1:9"},
        {"name": "gemini", "type": "gemini", "base_url": "http://127.0.0.1:9/v1beta"},
    ]
    models = [
        {"name": "ollama/*", "deployments": [{"backend": "ollama-1"}]},
        {"name": "gemini/*", "deployments": [{"backend": "gemini"}]},
    ]
    router = Router(parse_config({"backends": backends, "models": models}, "test"))
    router.learn("ollama-1", ["qwen2.5:0.5b"])
    router.learn("gemini", ["gemini-2.5-flash"])
    with pytest.raises(ModelNotFound) as refused:
        router.plan("gemini-2.5-flash")
    assert refused.value.message.endswith("Did you mean: gemini/gemini-2.5-flash?")
