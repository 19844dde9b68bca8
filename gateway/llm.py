"""The provider guide's library API, kept for the applications that embed it, over the gateway's providers.

    async with LLMProviderFactory.create_from_env("ollama") as provider:
        reply = await provider.generate([LLMMessage(LLMRole.USER, "Hello")], temperature=0.2, max_tokens=64)
        print(reply.content, reply.usage["total_tokens"])
        async for text in provider.generate_stream(messages, privacy="private"):
            ...

It runs without the server: no routing, no metrics, one backend, and private requests only to a
local one. Every failure is raised as `LLMError`, a ValueError (as the guide promised), e.g.
"Cannot connect to Ollama server at URL", with the backend's status and Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx
from pydantic import ValidationError

from gateway.body import validate
from gateway.config import (
    GEMINI_DEFAULT_URL,
    OLLAMA_DEFAULT_URL,
    OPENAI_DEFAULT_URL,
    ConfigError,
    GeminiBackend,
    OllamaBackend,
    OpenAIBackend,
    Timeouts,
    format_errors,
    from_variable,
)
from gateway.errors import GatewayError, InvalidRequest, UpstreamRejected
from gateway.policy import is_cloud_name
from gateway.privacy import LEVELS
from gateway.providers import build_provider
from gateway.providers.base import BackendConfig, Provider
from gateway.providers.ollama import OllamaProvider
from gateway.schemas import ChatRequest
from gateway.upstream import make_transport

DEFAULT_MODELS = {"ollama": "llama3.2", "openai": "gpt-4o-mini", "gemini": "gemini-2.5-flash"}
# How a private request tells a Phoenix gateway behind an OpenAI-compatible backend (its default
# `privacy.header`); servers that are not a gateway ignore it.
PRIVACY_HEADER = "x-privacy"
# What `LLMProviderFactory.create` takes in its config.
SETTINGS = ("base_url", "model", "temperature", "timeout", "api_key", "local")
# The part of the first-token deadline that connecting may take when its own timeout is as long:
# a connection not made within it is reported as such, before the first-token deadline runs out.
CONNECT_SHARE = 0.9
# Connections one provider opens at once; more calls wait for one, within their own deadlines.
MAX_CONNECTIONS = 20


class LLMError(ValueError):
    """A request the provider could not serve; the message says why, in the gateway's words.

    `status`: the backend's own HTTP status when it answered with an error (429, 500, ...); else
    the gateway's for the failure (503 unreachable, 504 out of time, 404 unknown model, 400 a
    request it refused), None for one refused before anything was sent. `code`: the error's code
    when there is one (`rate_limit_exceeded`, `model_not_found`, `privacy_violation`, ...).
    `retry_after`: the seconds the backend asked to wait before retrying (its Retry-After)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after

    @classmethod
    def from_gateway(cls, error: GatewayError, message: str | None = None) -> LLMError:
        """`message`: instead of the gateway's."""
        status = error.upstream_status if isinstance(error, UpstreamRejected) else error.http_status
        return cls(
            message or error.message, status=status, code=error.code, retry_after=_retry_after(error.headers)
        )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (a number of seconds; a date is not used)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = next((v for k, v in headers.items() if k.lower() == name), None)
        try:
            seconds = float(value) / scale if value is not None else None
        except ValueError:
            continue
        if seconds is not None and math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


class LLMRole(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class LLMMessage:
    role: LLMRole | str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": str(self.role), "content": self.content}


@dataclass(frozen=True, slots=True)
class LLMResponse:
    content: str
    model: str
    provider: str
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)


class LLMProvider:
    """One backend, one default model. Use as an async context manager, or call `aclose`.

    A private request (`privacy="private"`, or `metadata={"privacy": "private"}` as the gateway
    takes it) goes only to a backend whose config says `local`, and never to an Ollama cloud model
    (`:cloud`/`-cloud`, or one the instance's /api/show says it forwards: asked once per model
    before its first private request, and a lookup that fails refuses the request); else
    `LLMError`, and nothing is sent. An OpenAI-compatible backend gets
    it with the `x-privacy: private` header, so that a Phoenix gateway enforces it in turn."""

    def __init__(self, name: str, backend: BackendConfig, model: str, temperature: float | None = None,
                 api_key: str | None = None) -> None:  # fmt: skip
        self.name = name
        self.model = model
        self.temperature = temperature
        seconds, _ = _first_token_deadline(backend.timeouts)
        if backend.timeouts.connect >= seconds:  # else a connection never made would look like a slow answer
            timeouts = backend.timeouts.model_copy(update={"connect": seconds * CONNECT_SHARE})
            backend = backend.model_copy(update={"timeouts": timeouts})
        self._backend = backend
        self._environ = {backend.api_key_env: api_key} if backend.api_key_env and api_key else {}
        self._timeouts = backend.timeouts
        self._connections: _Connections | None = None
        self._remote: dict[str, bool] = {}  # Ollama model -> whether its instance forwards it

    async def __aenter__(self) -> LLMProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        connections, self._connections = self._connections, None
        if connections is not None and connections.loop is asyncio.get_running_loop():
            await connections.keeper.aclose()
        # Else they belong to another loop: closed when it shut down (asyncio.run does that), or
        # by its own finalizer when that loop is still running.

    async def _here(self) -> _Connections:
        """The connections of the running loop, opened on its first call: a connection belongs to
        the loop that made it, and one provider may serve several `asyncio.run` calls in turn."""
        loop = asyncio.get_running_loop()
        connections = self._connections
        if connections is None or connections.loop is not loop:
            connections = self._connections = await _Connections.open(self._backend, self._environ)
        return connections

    def _request(
        self, messages: Sequence[LLMMessage | Mapping[str, Any]], stream: bool, params: dict[str, Any]
    ) -> tuple[ChatRequest, bool]:
        """The request, and whether it is private (then it goes with the privacy tag). `params` are
        fields of an OpenAI chat request; those the gateway does not know go along as it sends them."""
        if "stream" in params:
            raise LLMError(
                "generate_stream always streams: it takes no stream argument"
                if stream
                else "generate takes no stream argument: use generate_stream for the answer piece by piece"
            )
        private = _stated_private(params.pop("privacy", None), params.get("metadata"))
        body: dict[str, Any] = {
            "model": params.pop("model", None) or self.model,
            "messages": [m.as_dict() if isinstance(m, LLMMessage) else dict(m) for m in messages],
            "stream": stream,
        }
        if params.get("temperature") is None and self.temperature is not None:
            params["temperature"] = self.temperature
        body.update({key: value for key, value in params.items() if value is not None})
        try:
            request = validate(ChatRequest, body)
        except InvalidRequest as error:
            raise LLMError(f"invalid request: {error.message}", code=error.code) from None
        if not private:
            return request, False
        backend = self._backend
        where = f"the {self.name} backend at {backend.base_url}"
        if not backend.local:
            raise LLMError(
                code="privacy_violation",
                message=f"This request is private and {where} is not local, so it was not sent. Private"
                " requests go only to a backend on the premises: set 'local': True in the config for"
                " one (a Phoenix gateway in front of local models enforces the tag itself).",
            )
        if isinstance(backend, OllamaBackend) and is_cloud_name(request.model):
            raise LLMError(
                code="privacy_violation",
                message=f"This request is private and the model {request.model!r} on {where} is an Ollama"
                " cloud model, forwarded to Ollama's hosted service, so it was not sent.",
            )
        return request, True

    async def generate(
        self,
        messages: Sequence[LLMMessage | Mapping[str, Any]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        privacy: str | None = None,
        **params: Any,
    ) -> LLMResponse:
        params.update(temperature=temperature, max_tokens=max_tokens, privacy=privacy)
        request, private = self._request(messages, False, params)
        provider = (await self._here()).provider(private)
        seconds, which = _first_token_deadline(self._timeouts)  # here it comes with the whole answer
        try:
            async with asyncio.timeout(seconds):
                if private:
                    await self._vet(provider, request.model)
                completion = await provider.complete(request, request.model)
        except GatewayError as error:
            raise self._failed(error) from None
        except TimeoutError:
            raise self._timed_out(which, seconds) from None
        choice = completion.choices[0]
        return LLMResponse(
            content=choice.content or "",
            model=request.model,
            provider=self.name,
            finish_reason=choice.finish_reason,
            usage=completion.usage.as_dict(),
        )

    async def generate_stream(
        self,
        messages: Sequence[LLMMessage | Mapping[str, Any]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        privacy: str | None = None,
        **params: Any,
    ) -> AsyncIterator[str]:
        """The answer's text, piece by piece as the backend produces it. The first chunk must come
        within the first-token timeout, each next one within the idle timeout, all within the total."""
        params.update(temperature=temperature, max_tokens=max_tokens, privacy=privacy)
        request, private = self._request(messages, True, params)
        provider = (await self._here()).provider(private)
        timeouts = self._timeouts
        loop = asyncio.get_running_loop()
        end = loop.time() + timeouts.total
        seconds, which = _first_token_deadline(timeouts)
        due = loop.time() + seconds
        if private:
            try:
                async with asyncio.timeout_at(due):
                    await self._vet(provider, request.model)
            except TimeoutError:
                raise self._timed_out(which, seconds) from None
        stream = provider.stream(request, request.model)
        try:
            while True:
                try:  # not across the yield: the caller's time with a piece is not the backend's
                    async with asyncio.timeout_at(due):
                        chunks = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._timed_out(which, seconds) from None
                for chunk in chunks:
                    if chunk.content:
                        yield chunk.content
                seconds, which, due = timeouts.idle, "idle", loop.time() + timeouts.idle
                if due >= end:
                    seconds, which, due = timeouts.total, "total", end
        except GatewayError as error:
            raise self._failed(error) from None
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def _vet(self, provider: Provider, model: str) -> None:
        """For a private request to Ollama: LLMError unless the instance says the model is its own.
        A name without `:cloud` proves nothing (`ollama cp gpt-oss:120b-cloud team-gpt`)."""
        if not isinstance(provider, OllamaProvider):
            return
        remote = self._remote.get(model)
        if remote is None:
            remote = await provider.remote(model)
            if remote is None:
                raise LLMError(
                    code="privacy_violation",
                    message=f"This request is private and whether the model {model!r} on the {self.name}"
                    f" backend at {self._backend.base_url} is local could not be learned (its /api/show"
                    " failed), so it was not sent.",
                )
            self._remote[model] = remote
        if remote:
            raise LLMError(
                code="privacy_violation",
                message=f"This request is private and the model {model!r} on the {self.name} backend at"
                f" {self._backend.base_url} is an Ollama cloud model, forwarded to Ollama's hosted"
                " service, so it was not sent.",
            )

    def _failed(self, error: GatewayError) -> LLMError:
        """The gateway's error in the library's words where they differ: the gateway's message for
        a refused key points its operator to the backend's `api_key_env`."""
        backend = self._backend
        if (
            isinstance(error, UpstreamRejected)
            and error.upstream_status in (401, 403)
            and backend.api_key_env
        ):
            return LLMError.from_gateway(
                error,
                f"the {self.name} backend at {backend.base_url} refused the API key"
                f" ({error.upstream_status}); check the provider's api_key ({backend.api_key_env}"
                " for create_from_env)",
            )
        return LLMError.from_gateway(error)

    def _timed_out(self, which: str, seconds: float) -> LLMError:
        return LLMError(
            f"Timed out waiting for the {self.name} backend at {self._backend.base_url}:"
            f" its {which} timeout ({seconds:g} s) ran out",
            status=504,
        )

    async def list_available_models(self) -> list[str]:
        """The backend's models, listed within the first-token timeout, as an answer must come."""
        provider = (await self._here()).provider(private=False)
        seconds, which = _first_token_deadline(self._timeouts)
        try:
            async with asyncio.timeout(seconds):
                return [model.id for model in await provider.list_models()]
        except GatewayError as error:
            raise self._failed(error) from None
        except TimeoutError:
            raise self._timed_out(which, seconds) from None

    async def is_model_available(self, model: str | None = None) -> bool:
        model = model or self.model
        names = await self.list_available_models()
        return model in names or f"{model}:latest" in names


@dataclass(frozen=True, slots=True)
class _Connections:
    """One event loop's transport, and the providers that send through it. `keeper` closes the
    transport: when the provider is closed, or when the loop shuts down without that (asyncio.run
    closes every async generator still open before it closes the loop)."""

    loop: asyncio.AbstractEventLoop
    public: Provider
    private: Provider  # sends the privacy tag along
    keeper: AsyncGenerator[None, None]

    @classmethod
    async def open(cls, backend: BackendConfig, environ: Mapping[str, str]) -> _Connections:
        # A call's wait for a free connection is bounded by its own deadline (the total at most),
        # not by the connect timeout, which bounds connecting alone.
        transport = make_transport(MAX_CONNECTIONS, wait=backend.timeouts.total)
        public = private = build_provider(backend, transport, environ)
        if isinstance(backend, OpenAIBackend):
            tagged = backend.model_copy(update={"headers": {**backend.headers, PRIVACY_HEADER: "private"}})
            private = build_provider(tagged, transport, environ)
        keeper = _closing(transport)
        await anext(keeper)  # now the loop knows it, and closes it at its shutdown
        return cls(asyncio.get_running_loop(), public, private, keeper)

    def provider(self, private: bool) -> Provider:
        return self.private if private else self.public


async def _closing(transport: httpx.AsyncBaseTransport) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await transport.aclose()


def _stated_private(privacy: object, metadata: object) -> bool:
    """Whether the `privacy` argument or `metadata.privacy` says private; each may also say public
    (which overrides nothing), any other value is an LLMError naming it."""
    stated = [(privacy, "privacy")]
    if isinstance(metadata, Mapping):
        stated.append((metadata.get("privacy"), "metadata.privacy"))
    for value, name in stated:
        if value is not None and (not isinstance(value, str) or value.strip().lower() not in LEVELS):
            raise LLMError(f"invalid request: {name} must be 'private' or 'public', got {value!r}")
    return any(isinstance(value, str) and value.strip().lower() == "private" for value, _ in stated)


def _first_token_deadline(timeouts: Timeouts) -> tuple[float, str]:
    """Seconds for the first token, within the total, and the name of the one that applies."""
    if timeouts.first_token <= timeouts.total:
        return timeouts.first_token, "first-token"
    return timeouts.total, "total"


def _timeouts(timeout: object) -> Timeouts:
    if timeout is None:
        return Timeouts()
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout: expected a number of seconds above 0, got {timeout!r}")
    return Timeouts(connect=min(timeout, 5.0), first_token=timeout, idle=timeout, total=timeout)


def _checked(config: Mapping[str, Any]) -> None:
    """ValueError naming a setting `create` does not take, or a value it cannot use."""
    unknown = sorted(str(key) for key in config if key not in SETTINGS)
    if unknown:
        raise ValueError(f"unknown setting {', '.join(map(repr, unknown))}; known: {', '.join(SETTINGS)}")
    temperature = config.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        raise ValueError(f"temperature: expected a number from 0 to 2, got {temperature!r}")
    model = config.get("model")
    if model is not None and not (isinstance(model, str) and model.strip()):
        raise ValueError(f"model: expected a model name, got {model!r}")


def _backend(name: str, config: Mapping[str, Any]) -> BackendConfig:
    settings: dict[str, Any] = {"name": name, "type": name, "timeouts": _timeouts(config.get("timeout"))}
    if config.get("local") is not None:
        settings["local"] = config["local"]
    if name == "ollama":
        return OllamaBackend(**settings, base_url=config.get("base_url") or OLLAMA_DEFAULT_URL)
    if name == "openai":
        url = config.get("base_url") or OPENAI_DEFAULT_URL
        return OpenAIBackend(**settings, base_url=url, api_key_env="OPENAI_API_KEY")
    url = config.get("base_url") or GEMINI_DEFAULT_URL
    return GeminiBackend(**settings, base_url=url, api_key_env="GEMINI_API_KEY")


class LLMProviderFactory:
    PROVIDERS = ("ollama", "openai", "gemini")

    @staticmethod
    def create(provider: str, config: Mapping[str, Any] | None = None) -> LLMProvider:
        """`config`: base_url, model, temperature, timeout (seconds), api_key (openai, gemini), local
        (whether private requests may go to the backend; by default only to Ollama)."""
        config = dict(config or {})
        name = provider.strip().lower()
        if name not in LLMProviderFactory.PROVIDERS:
            known = ", ".join(LLMProviderFactory.PROVIDERS)
            raise LLMError(f"unknown provider {provider!r}; available: {known}")
        try:
            _checked(config)
        except ValueError as error:
            raise LLMError(f"invalid {name} config: {error}") from None
        api_key = config.get("api_key")
        if name != "ollama" and not api_key:
            raise LLMError(f"the {name} provider needs an api_key")
        try:
            backend = _backend(name, config)
        except ValidationError as error:
            raise LLMError(format_errors(f"invalid {name} config", error)) from None
        except ValueError as error:
            raise LLMError(f"invalid {name} config: {error}") from None
        model = config.get("model") or DEFAULT_MODELS[name]
        return LLMProvider(name, backend, model, config.get("temperature"), api_key)

    @staticmethod
    def create_from_env(provider: str | None = None, environ: Mapping[str, str] | None = None) -> LLMProvider:
        """Ollama: OLLAMA_BASE_URL (the first, if several), OLLAMA_MODEL; OpenAI: OPENAI_API_KEY,
        OPENAI_MODEL, OPENAI_BASE_URL; Gemini: GEMINI_API_KEY, GEMINI_MODEL. LLM_PROVIDER picks when
        `provider` is None."""
        environ = os.environ if environ is None else environ
        # a blank LLM_PROVIDER is an unset one, as `serve` reads it
        name = (provider or environ.get("LLM_PROVIDER", "").strip() or "ollama").strip().lower()
        prefix = name.upper()
        config: dict[str, Any] = {
            "model": environ.get(f"{prefix}_MODEL"),
            "api_key": environ.get(f"{prefix}_API_KEY"),
        }
        if name == "ollama":
            config["base_url"] = environ.get("OLLAMA_BASE_URL", OLLAMA_DEFAULT_URL).split(",")[0].strip()
        elif name == "openai":
            config["base_url"] = environ.get("OPENAI_BASE_URL")
        if config.get("base_url"):  # a bad one is named by the variable the user set, as `serve` does
            try:
                from_variable(
                    f"{prefix}_BASE_URL", {"name": name, "type": name, "base_url": config["base_url"]}
                )
            except ConfigError as error:
                raise LLMError(str(error)) from None
        return LLMProviderFactory.create(name, config)


__all__ = ["LLMError", "LLMMessage", "LLMProvider", "LLMProviderFactory", "LLMResponse", "LLMRole"]
