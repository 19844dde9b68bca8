"""Backend adapters. Each module exposes the same names: build_request, parse_response,
parse_chunk and <Name>Provider; translation is pure functions, I/O a thin class."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from gateway.config import GeminiBackend, OllamaBackend, OpenAIBackend
from gateway.providers.base import BackendConfig, Provider
from gateway.providers.gemini import GeminiProvider
from gateway.providers.ollama import OllamaProvider
from gateway.providers.openai import OpenAIProvider


def build_provider(
    backend: BackendConfig, transport: httpx.AsyncBaseTransport, environ: Mapping[str, str]
) -> Provider:
    api_key = backend.api_key(environ)
    if isinstance(backend, OllamaBackend):
        return OllamaProvider(backend, transport, api_key)
    if isinstance(backend, OpenAIBackend):
        return OpenAIProvider(backend, transport, api_key)
    if isinstance(backend, GeminiBackend):
        return GeminiProvider(backend, transport, api_key)
    raise TypeError(f"unknown backend {backend!r}")
