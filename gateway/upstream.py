"""The shared httpx client, and the one place where httpx's exceptions become gateway errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson

from gateway.config import GeminiBackend, OllamaBackend, OpenAIBackend
from gateway.errors import GatewayError, UpstreamProtocol, UpstreamTimeout, UpstreamUnavailable
from gateway.ndjson import LineTooLong
from gateway.transport import AiohttpTransport

# What a backend type is called in messages: "Cannot connect to Ollama server at URL".
LABELS = {"ollama": "Ollama", "openai": "OpenAI-compatible", "gemini": "Gemini"}


def make_client(max_connections: int = 1000) -> httpx.AsyncClient:
    """One pooled client for every backend, on aiohttp's pool (see `transport`). Deadlines are
    enforced by dispatch, not by httpx reads."""
    return httpx.AsyncClient(
        transport=AiohttpTransport(max_connections),
        timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=30.0),
        follow_redirects=False,
    )


def client_timeout(connect: float) -> httpx.Timeout:
    return httpx.Timeout(connect=connect, read=None, write=30.0, pool=connect)


@asynccontextmanager
async def mapped_errors(kind: str, base_url: str, *, started: bool = False) -> AsyncIterator[None]:
    """Map transport failures to the error tree. `started`: bytes already came from the backend."""
    label = LABELS.get(kind, kind)
    try:
        yield
    except GatewayError:
        raise
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        raise UpstreamUnavailable(f"Cannot connect to {label} server at {base_url}") from error
    except httpx.PoolTimeout as error:
        raise UpstreamUnavailable(f"No free connection to {label} server at {base_url}") from error
    except httpx.TimeoutException as error:
        raise UpstreamTimeout(f"{label} server at {base_url} timed out") from error
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as error:
        if started:
            raise UpstreamProtocol(
                f"{label} server at {base_url} closed the connection mid-stream"
            ) from error
        raise UpstreamUnavailable(f"{label} server at {base_url} closed the connection") from error
    except LineTooLong as error:
        raise UpstreamProtocol(f"{label} server at {base_url} sent an over-long line") from error
    except (orjson.JSONDecodeError, UnicodeDecodeError) as error:
        raise UpstreamProtocol(f"{label} server at {base_url} sent malformed JSON") from error
    except httpx.HTTPError as error:
        raise UpstreamProtocol(f"{label} server at {base_url} failed: {type(error).__name__}") from error


def json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


URL_CACHE_SIZE = 256
ErrorMapper = Callable[[int, bytes, str, Mapping[str, str]], GatewayError]


class Upstream:
    """HTTP to one backend: JSON calls and streamed bodies, every failure mapped to the error tree.

    `error_from(status, content, model, headers)` turns the backend's own error answers into
    gateway errors; it is the one protocol-specific part.
    """

    def __init__(
        self,
        kind: str,
        base_url: str,
        client: httpx.AsyncClient,
        headers: Mapping[str, str],
        *,
        connect_timeout: float,
        error_from: ErrorMapper,
    ) -> None:
        self.kind = kind
        self.base_url = base_url
        self._client = client
        self._headers = dict(headers)
        self._timeout = client_timeout(connect_timeout)
        self._error_from = error_from
        self._urls: dict[str, httpx.URL] = {}  # parsed once per path: parsing is a cost per request

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = httpx.URL(self.base_url + path)
            if len(self._urls) < URL_CACHE_SIZE:  # paths can hold client-chosen model names
                self._urls[path] = url
        return url

    @classmethod
    def for_backend(
        cls,
        backend: OllamaBackend | OpenAIBackend | GeminiBackend,
        client: httpx.AsyncClient,
        auth: Mapping[str, str],
        error_from: ErrorMapper,
    ) -> Upstream:
        """From a backend's config: its type, URL, extra headers and connect timeout, plus auth headers."""
        headers = {**backend.headers, **auth}
        return cls(backend.type, backend.base_url, client, headers,
                   connect_timeout=backend.timeouts.connect, error_from=error_from)  # fmt: skip

    async def request(self, method: str, path: str, body: Any = None, model: str = "") -> Any:
        content = orjson.dumps(body) if body is not None else None
        async with mapped_errors(self.kind, self.base_url):
            response = await self._client.request(
                method, self._url(path), content=content, headers=self._headers, timeout=self._timeout
            )
        if response.status_code != 200:
            raise self._error_from(response.status_code, response.content, model, response.headers)
        async with mapped_errors(self.kind, self.base_url, started=True):
            return orjson.loads(response.content)

    @asynccontextmanager
    async def stream(self, path: str, body: Any, model: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """The response body as it arrives; closing the context closes the upstream connection."""
        async with mapped_errors(self.kind, self.base_url):
            request = self._client.build_request(
                "POST",
                self._url(path),
                content=orjson.dumps(body),
                headers=self._headers,
                timeout=self._timeout,
            )
            response = await self._client.send(request, stream=True)
        try:
            if response.status_code != 200:
                async with mapped_errors(self.kind, self.base_url):
                    content = await response.aread()
                raise self._error_from(response.status_code, content, model, response.headers)
            # Whatever fails while the caller reads and decodes the body is mapped here.
            async with mapped_errors(self.kind, self.base_url, started=True):
                yield response.aiter_raw()
        finally:
            await response.aclose()
