"""Backend adapters. Each module exposes the same names: build_request, parse_response,
parse_chunk and <Name>Provider; translation is pure functions, I/O a thin class."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from gateway.config import GeminiBackend, Images, OllamaBackend, OpenAIBackend
from gateway.images import ImageFetcher
from gateway.providers.base import BackendConfig, Provider
from gateway.providers.gemini import GeminiProvider
from gateway.providers.ollama import OllamaProvider
from gateway.providers.openai import OpenAIProvider


def build_provider(
    backend: BackendConfig,
    transport: httpx.AsyncBaseTransport,
    environ: Mapping[str, str],
    images: Images | None = None,
) -> Provider:
    """`images`: how http(s) image URLs are fetched for backends that need the bytes (Ollama, Gemini);
    None or `fetch: false` refuses such URLs. OpenAI-compatible backends get the URL as it came."""
    api_key = backend.api_key(environ)
    fetcher = ImageFetcher(images) if images is not None and images.fetch else None
    if isinstance(backend, OllamaBackend):
        return OllamaProvider(backend, transport, api_key, fetcher)
    if isinstance(backend, OpenAIBackend):
        return OpenAIProvider(backend, transport, api_key)
    if isinstance(backend, GeminiBackend):
        return GeminiProvider(backend, transport, api_key, fetcher)
    raise TypeError(f"unknown backend {backend!r}")
