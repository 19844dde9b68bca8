"""An httpx transport that sends through aiohttp's connection pool.

The profile in bench/README.md found httpx's own pool (httpcore) to be most of the gateway's cost
at 64 concurrent requests: it scans every pooled connection on each request. This transport keeps
httpx's API (and pytest-httpx) for the code above it and hands the wire to aiohttp, whose pool and
HTTP parser are C-accelerated. Every aiohttp failure becomes the httpx exception that says the same
thing, so `upstream.MappedErrors` sees one vocabulary: refused or unresolvable -> ConnectError,
connect deadline -> ConnectTimeout, the peer closing mid-body -> RemoteProtocolError or ReadError,
an answer aiohttp cannot parse -> `http1.MalformedAnswer`, as the plain-http client says it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx

from gateway.http1 import MalformedAnswer


@contextmanager
def _as_httpx(request: httpx.Request, *, reading: bool) -> Iterator[None]:
    try:
        yield
    except aiohttp.ClientConnectorError as error:
        raise httpx.ConnectError(str(error), request=request) from error
    except (aiohttp.ConnectionTimeoutError, aiohttp.ServerTimeoutError) as error:
        raise httpx.ConnectTimeout(str(error), request=request) from error
    except TimeoutError as error:
        raise (httpx.ReadTimeout if reading else httpx.ConnectTimeout)(str(error), request=request) from error
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as error:
        raise httpx.RemoteProtocolError(str(error), request=request) from error
    except aiohttp.ClientResponseError as error:  # an answer aiohttp cannot parse
        raise MalformedAnswer(f"malformed answer: {error.message}", request=request) from error
    except (aiohttp.ClientOSError, ConnectionError) as error:
        raise httpx.ReadError(str(error), request=request) from error
    except aiohttp.InvalidURL as error:
        raise httpx.UnsupportedProtocol(str(error), request=request) from error
    except aiohttp.ClientError as error:
        raise httpx.TransportError(str(error), request=request) from error


class _Body(httpx.AsyncByteStream):
    def __init__(self, request: httpx.Request, response: aiohttp.ClientResponse) -> None:
        self._request = request
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx(self._request, reading=True):
            while data := await self._response.content.readany():
                yield data

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # read to the end: the connection goes back to the pool
        else:
            self._response.close()  # abandoned mid-body: closing it tells the backend to stop


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Plain HTTP/1.1 with keep-alive, up to `max_connections` at once. No redirects, no cookies,
    no decompression: what the backend sent is what httpx sees. A request that finds no connection
    free waits for one up to its pool deadline, or `wait` seconds when that is set."""

    def __init__(self, max_connections: int = 1000, wait: float | None = None) -> None:
        self._max_connections = max_connections
        self._wait = wait
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        deadlines = request.extensions.get("timeout", {})
        # aiohttp's `connect` covers the wait for a free connection and connecting after it
        connect = (
            deadlines.get("pool") if self._wait is None else self._wait + (deadlines.get("connect") or 0)
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect,
            sock_connect=deadlines.get("connect"),
            sock_read=deadlines.get("read"),
        )
        body = await request.aread()
        with _as_httpx(request, reading=False):
            response = await self._open().request(
                request.method,
                str(request.url),
                headers=list(request.headers.multi_items()),
                data=body or None,
                allow_redirects=False,
                compress=False,
                timeout=timeout,
            )
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(request, response),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)  # let the connector's transports close
