"""The shared httpx client, and the one place where httpx's exceptions become gateway errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson

from gateway.errors import GatewayError, UpstreamProtocol, UpstreamTimeout, UpstreamUnavailable
from gateway.ndjson import LineTooLong

# What a backend type is called in messages: "Cannot connect to Ollama server at URL".
LABELS = {"ollama": "Ollama", "openai": "OpenAI-compatible", "gemini": "Gemini"}


def make_client(max_connections: int = 1000) -> httpx.AsyncClient:
    """One pooled client for every backend. Deadlines are enforced by dispatch, not by httpx reads."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=30.0),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
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
