"""The gateway's configuration: one YAML file, or the zero-file default built from the environment.

Everything is validated by pydantic with `extra="forbid"`: an unknown key or a bad value is an
error that names the file and the key, before the gateway serves a single request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
OLLAMA_DEFAULT_URL = "http://localhost:11434"
OPENAI_DEFAULT_URL = "https://api.openai.com/v1"
GEMINI_DEFAULT_URL = "https://generativelanguage.googleapis.com/v1beta"
REDIS_EXAMPLE = "not a Redis URL such as redis://host:6379/0"


class ConfigError(Exception):
    """A configuration that cannot be served; the message names the source and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Seconds. A cold Ollama model load can take minutes, hence the generous first token."""

    connect: float = Field(default=5.0, gt=0)
    first_token: float = Field(default=300.0, gt=0)
    idle: float = Field(default=120.0, gt=0)
    total: float = Field(default=1800.0, gt=0)


class _Backend(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    weight: int = Field(default=1, ge=1)
    max_inflight: int | None = Field(default=None, ge=1)
    timeouts: Timeouts = Timeouts()
    headers: dict[str, str] = {}
    api_key_env: str | None = None

    @field_validator("base_url", check_fields=False)
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        # The URL is in error messages and logs; never echo it here: without its scheme,
        # `user:password@host` does not even parse as carrying credentials.
        backend = f" (backend {info.data['name']!r})" if "name" in info.data else ""
        try:
            parts = urlsplit(value)
        except ValueError:  # an IPv6 address without its ]
            raise ValueError(f"its host is not a host name or address{backend}") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an http(s) URL: http:// or https://, then the host{backend}")
        if "@" in value:  # wherever it is: a '/' in a password ends the host part before it
            raise ValueError(
                "must not carry credentials (user:password@, not shown here): give them in `headers`"
                " or `api_key_env`, which stay out of logs and error messages; an '@' elsewhere is"
                f" written %40{backend}"
            )
        problem = _address_problem(value)
        if problem is None:
            try:
                httpx.URL(value)  # as the gateway's requests will read it
            except httpx.InvalidURL:
                problem = "its host is not a host name or address"
        if problem is not None:
            raise ValueError(f"{problem}{backend}")
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _sendable_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if name.lower() in ("content-length", "transfer-encoding", "connection"):
                raise ValueError(f"{name!r} is set by the gateway for each request, not in the config")
            if any(c in name + text for c in "\r\n") or ":" in name or not name.strip():
                raise ValueError(
                    f"header {name!r} is not a valid header line (a line break, or a colon in the name)"
                )
        return value

    def api_key(self, environ: Mapping[str, str]) -> str | None:
        return environ.get(self.api_key_env) if self.api_key_env else None


class OllamaBackend(_Backend):
    type: Literal["ollama"]
    base_url: str = OLLAMA_DEFAULT_URL
    local: bool = True

    @model_validator(mode="before")
    @classmethod
    def _hosted_is_not_local(cls, data: Any) -> Any:
        """Ollama's hosted API (ollama.com) speaks the same protocol, but off the premises: there
        `local` is false unless the config says otherwise."""
        if isinstance(data, dict) and "local" not in data and isinstance(data.get("base_url"), str):
            host = ""
            with suppress(ValueError):  # a URL that does not parse is refused, named, by _http_url
                # a name may end in the root's dot (`ollama.com.`): the same host
                host = (urlsplit(data["base_url"]).hostname or "").lower().rstrip(".")
            if host == "ollama.com" or host.endswith(".ollama.com"):
                return {**data, "local": False}
        return data


class OpenAIBackend(_Backend):
    type: Literal["openai"]
    base_url: str = OPENAI_DEFAULT_URL
    local: bool = False


class GeminiBackend(_Backend):
    type: Literal["gemini"]
    base_url: str = GEMINI_DEFAULT_URL
    local: bool = False


Backend = Annotated[OllamaBackend | OpenAIBackend | GeminiBackend, Field(discriminator="type")]


class Deployment(_Strict):
    backend: str
    model: str | None = None  # upstream model name; defaults to the client-facing name


class ModelRoute(_Strict):
    name: str = Field(min_length=1)
    aliases: list[str] = []
    deployments: list[Deployment] = Field(min_length=1)
    fallbacks: list[str] = []
    privacy: Literal["private", "public"] | None = None

    @property
    def is_pattern(self) -> bool:
        return "*" in self.name

    @field_validator("name")
    @classmethod
    def _one_star(cls, name: str) -> str:
        """A pattern's one `*` is the upstream model name: with two, the part cut out of the name
        asked for was not what either matched (`local/*/*` sent `local/x/llama3.2` as `x/llama3`)."""
        if name.count("*") > 1:
            raise ValueError(f"{name!r}: a pattern has one '*', whose match is the upstream model name")
        return name

    @field_validator("aliases")
    @classmethod
    def _exact_aliases(cls, aliases: list[str], info: ValidationInfo) -> list[str]:
        if aliases and "*" in info.data.get("name", ""):
            raise ValueError("a pattern has no aliases (each name it matches is asked for as it is)")
        return aliases


class Limits(_Strict):
    """The budgets of one API key (or of every anonymous caller together): per minute, and at once."""

    rpm: int | None = Field(default=None, ge=1)  # requests per minute
    tpm: int | None = Field(default=None, ge=1)  # tokens per minute: prompt + completion
    max_inflight: int | None = Field(default=None, ge=1)  # requests under way at once, streams included

    @property
    def limiting(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_inflight)


class RateLimits(_Strict):
    default: Limits = Limits()  # for keys without their own, and for the open gateway's callers
    redis_url: str | None = None  # redis://host:6379/0 : one budget shared by every replica
    redis_prefix: str = "phoenix:rl:"
    fail_open: bool = True  # Redis unreachable: let requests through (logged), or refuse them with 503

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        """Read as Redis will read it when the store is built, so that check-config, serve and a
        reload all refuse it here, naming the key. The URL may hold a password: never echoed, nor
        any text of the parser's, which may quote a piece of it."""
        if value is None:
            return None
        from redis.connection import parse_url  # noqa: PLC0415 only configs that name Redis import it

        scheme, separator, rest = value.partition("://")
        if not separator or scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{REDIS_EXAMPLE} (no redis://, rediss:// or unix:// scheme)")
        userinfo, address = _split_userinfo(rest)
        if userinfo is not None and any(c in userinfo for c in "/?#"):
            raise ValueError(
                f"{REDIS_EXAMPLE} (its user or password, hidden here, holds '/', '?' or '#': write"
                " them percent-encoded, as %2F, %3F and %23; or an '@' stands after the host, e.g. in"
                " a query value, where it must be written %40)"
            )
        problem = None if scheme == "unix" else _address_problem(f"{scheme}://{address}")
        if problem is None:
            try:
                parse_url(value)  # type: ignore[no-untyped-call]
            except ValueError:
                problem = "Redis cannot read its host, port or query parameters"
        if problem is not None:
            raise ValueError(f"{REDIS_EXAMPLE} ({problem})")
        return value


def _split_userinfo(rest: str) -> tuple[str | None, str]:
    """A URL after its `scheme://` as (user:password, or None; the rest). The user part runs to the
    last '@', whatever the password holds, so no character of it can pass for the host or port."""
    userinfo, at, address = rest.rpartition("@")
    return (userinfo, address) if at else (None, rest)


def _address_problem(url: str) -> str | None:
    """What is wrong with the host and port of `url` (one without credentials), or None."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an IPv6 address without its ]
        return "its host is not a host name or address"
    try:
        port = parts.port
    except ValueError:
        port = 0
    return "its port is not a whole number from 1 to 65535" if port == 0 else None


class ApiKey(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    key_env: str | None = None
    models: list[str] = ["*"]
    privacy: Literal["private", "public"] | None = None
    limits: Limits | None = None  # this key's own limits; absent: rate_limits.default

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKey:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError("give exactly one of 'key_sha256' or 'key_env'")
        return self


class Auth(_Strict):
    keys: list[ApiKey] = []


class Health(_Strict):
    interval: float = Field(default=10.0, gt=0)
    unhealthy_after: int = Field(default=3, ge=1)
    cooldown: float = Field(default=30.0, gt=0)


class Routing(_Strict):
    strategy: Literal["round_robin", "weighted", "least_inflight", "latency"] = "least_inflight"
    affinity: Literal["none", "prefix"] = "none"
    retries: int = Field(default=2, ge=0, le=10)
    max_wait: float = Field(default=10.0, ge=0)  # seconds a request waits for room under max_inflight
    health: Health = Health()


class Privacy(_Strict):
    header: str = Field(default="x-privacy", pattern=r"^[A-Za-z0-9-]+$")
    detect_pii: bool = True
    # The detector reads text. "private": a request carrying images, audio or files stays local.
    attachments: Literal["public", "private"] = "public"
    local_model: str | None = None
    audit_log: str | None = None

    @field_validator("header")
    @classmethod
    def _lower_case(cls, value: str) -> str:
        return value.lower()  # header names arrive lower-case: `X-Privacy` must match them


class Images(_Strict):
    """Fetching http(s) image URLs for backends that take only inline bytes (Ollama, Gemini)."""

    fetch: bool = True
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    timeout: float = Field(default=10.0, gt=0)
    content_types: list[str] = ["image/png", "image/jpeg", "image/webp", "image/gif"]
    allow_private_networks: bool = False  # loopback, link-local and private ranges (SSRF) stay refused
    max_per_request: int = Field(default=16, ge=1)  # URL parts, repeats too: what one request may hold


class Server(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    body_timeout: float = Field(default=30, gt=0)  # seconds a request body may go without a byte (then 408)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_timeout: int = Field(default=30, ge=0)  # SIGTERM: seconds requests in flight may take to finish


class Config(_Strict):
    server: Server = Server()
    auth: Auth = Auth()
    backends: list[Backend] = Field(min_length=1)
    models: list[ModelRoute] = Field(min_length=1)
    routing: Routing = Routing()
    privacy: Privacy = Privacy()
    rate_limits: RateLimits = RateLimits()
    images: Images = Images()

    @model_validator(mode="after")
    def _references(self) -> Config:
        backends = [backend.name for backend in self.backends]
        _unique(backends, "backend name")
        _unique([name for route in self.models for name in (route.name, *route.aliases)], "model name")
        _unique([key.name for key in self.auth.keys], "auth key name")
        # the same secret twice: whichever came last would decide its privacy policy and limits
        _unique([key.key_sha256.lower() for key in self.auth.keys if key.key_sha256], "auth key_sha256")
        _unique([key.key_env for key in self.auth.keys if key.key_env], "auth key_env")
        names = {name for route in self.models for name in (route.name, *route.aliases)}
        patterns = {route.name for route in self.models if route.is_pattern}
        for route in self.models:
            for deployment in route.deployments:
                if deployment.backend not in backends:
                    raise ValueError(
                        f"model {route.name!r} names unknown backend {deployment.backend!r}"
                        f" (known: {', '.join(backends)})"
                    )
            for fallback in route.fallbacks:
                if fallback not in names:
                    raise ValueError(f"model {route.name!r} falls back to unknown model {fallback!r}")
                if fallback in patterns:  # it would be asked for as its own name: `ollama pull *`
                    raise ValueError(
                        f"model {route.name!r} falls back to {fallback!r}, a pattern: name one model"
                    )
        local_model = self.privacy.local_model
        if local_model is not None and local_model not in names:
            raise ValueError(f"privacy.local_model names unknown model {local_model!r}")
        if local_model in patterns:
            raise ValueError(f"privacy.local_model names {local_model!r}, a pattern: name one model")
        return self

    def backend(self, name: str) -> OllamaBackend | OpenAIBackend | GeminiBackend:
        return next(backend for backend in self.backends if backend.name == name)


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate {what} {name!r}")
        seen.add(name)


BACKEND_TYPES = "ollama, openai (any OpenAI-compatible server: vLLM, llama.cpp, LM Studio) or gemini"


def format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "union_tag_not_found":  # pydantic: "Unable to extract tag using ..."
            where, message = f"{where}.type", f"required: {BACKEND_TYPES}"
        elif item["type"] == "union_tag_invalid":
            tag = (item.get("ctx") or {}).get("tag")
            where, message = f"{where}.type", f"expected {BACKEND_TYPES}, got {tag!r}"
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, source: str) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_errors(source, error)) from None


class _DuplicateKey(yaml.YAMLError):
    """A mapping that names one key twice (PyYAML would keep the last silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: a second `auth:` pasted
    below the first would otherwise replace it without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges, and overrides what it merges, on purpose
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(f"key {key!r} is given twice, at lines {lines[key]} and {line}")
            lines[key] = line
        return super().construct_mapping(node, deep)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except _DuplicateKey as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return parse_config(data, str(path))


def from_variable(variable: str, backend: dict[str, Any]) -> dict[str, Any]:
    """`backend`, built from `variable`, checked here: a bad value is reported under the variable
    the operator set, not under a config key they never wrote (`backends.0.ollama.base_url`)."""
    model = OllamaBackend if backend["type"] == "ollama" else OpenAIBackend
    try:
        model.model_validate(backend)
    except ValidationError as error:
        problems = [item["msg"].removeprefix("Value error, ") for item in error.errors(include_url=False)]
        raise ConfigError(f"environment: {variable}: {'; '.join(problems)}") from None
    return backend


def config_from_env(environ: Mapping[str, str]) -> Config:
    """The provider guide's zero-file set-up: Ollama by default, OpenAI and Gemini when keyed."""
    given = environ.get("OLLAMA_BASE_URL", "").strip() or OLLAMA_DEFAULT_URL  # empty: unset, as gateway.llm
    urls = [url.strip() for url in given.split(",") if url.strip()]
    if not urls:
        raise ConfigError(
            f"environment: OLLAMA_BASE_URL: no URL in {given!r}; give one, or several separated by commas"
        )
    ollama = ["ollama"] if len(urls) == 1 else [f"ollama-{i}" for i in range(1, len(urls) + 1)]
    backends: list[dict[str, Any]] = [
        from_variable("OLLAMA_BASE_URL", {"name": name, "type": "ollama", "base_url": url})
        for name, url in zip(ollama, urls, strict=True)
    ]
    by_provider = {"ollama": ollama}
    if environ.get("OPENAI_API_KEY"):
        backends.append(
            from_variable(
                "OPENAI_BASE_URL",
                {
                    "name": "openai",
                    "type": "openai",
                    "base_url": environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_URL,
                    "api_key_env": "OPENAI_API_KEY",
                },
            )
        )
        by_provider["openai"] = ["openai"]
    if environ.get("GEMINI_API_KEY"):
        backends.append({"name": "gemini", "type": "gemini", "api_key_env": "GEMINI_API_KEY"})
        by_provider["gemini"] = ["gemini"]

    provider = environ.get("LLM_PROVIDER", "ollama").strip().lower() or "ollama"
    if provider not in ("ollama", "openai", "gemini"):
        raise ConfigError(f"environment: LLM_PROVIDER: expected ollama, openai or gemini, got {provider!r}")
    if provider not in by_provider:
        key = f"{provider.upper()}_API_KEY"
        raise ConfigError(f"environment: LLM_PROVIDER is {provider!r} but {key} is not set")

    def deployments(names: list[str], model: str | None = None) -> list[dict[str, Any]]:
        return [{"backend": name, "model": model} for name in names]

    models: list[dict[str, Any]] = []
    default_model = environ.get("OLLAMA_MODEL", "").strip()
    if default_model:
        models.append({"name": "default", "deployments": deployments(ollama, default_model)})
    models += [
        {"name": f"{prefix}/*", "deployments": deployments(names)} for prefix, names in by_provider.items()
    ]
    models.append({"name": "*", "deployments": deployments(by_provider[provider])})
    return parse_config({"backends": backends, "models": models}, "environment")


def resolve_config(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """`--config`, else `PHOENIX_CONFIG`, else the environment default; never a file found by looking."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("PHOENIX_CONFIG") or None
    return load_config(path) if path else config_from_env(environ)
