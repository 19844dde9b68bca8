"""HTTP to the backends, and the one place where transport failures become gateway errors.

Plain-http backends go through `gateway.http1` (the gateway's own HTTP/1.1 client); https ones,
and any transport that is not the gateway's own (pytest-httpx's, in the provider tests), through
httpx's transport interface. Both speak httpx's exception vocabulary."""

from __future__ import annotations

import errno
import functools
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import httpx
import orjson

from gateway.config import GeminiBackend, OllamaBackend, OpenAIBackend
from gateway.errors import (
    GatewayError,
    Unavailable,
    UpstreamConnectTimeout,
    UpstreamProtocol,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.http1 import MalformedAnswer, Pool, Response, Target, encode_headers
from gateway.ndjson import LineTooLong
from gateway.transport import AiohttpTransport

# What a backend type is called in messages: "Cannot connect to Ollama server at URL".
LABELS = {"ollama": "Ollama", "openai": "OpenAI-compatible", "gemini": "Gemini"}
# Seconds a whole answer's body may take to end once the caller is done with it (see `let_end`).
END_GRACE = 0.05
# OS errors in connecting that are the gateway's own trouble, not the backend's.
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})


class GatewayTransport(AiohttpTransport):
    """aiohttp's pool for https (and httpx's interface), and `http1.Pool` for plain http.
    `wait`: seconds a request waits for a free connection; None: its connect deadline."""

    def __init__(self, max_connections: int = 1000, wait: float | None = None) -> None:
        super().__init__(max_connections, wait)
        self.plain = Pool(max_connections, wait)

    async def aclose(self) -> None:
        await self.plain.aclose()
        await super().aclose()


def make_transport(max_connections: int = 1000, wait: float | None = None) -> httpx.AsyncBaseTransport:
    """The connection pools every backend shares (see GatewayTransport)."""
    return GatewayTransport(max_connections, wait)


def request_timeout(connect: float) -> dict[str, float | None]:
    """httpx's per-request timeout extension. Only connecting is bounded here; the deadlines for
    the first token, between chunks and in total are dispatch's and relay's."""
    return httpx.Timeout(connect=connect, read=None, write=30.0, pool=connect).as_dict()


def translated(error: Exception, kind: str, base_url: str, started: bool) -> Exception:
    """The gateway error for a transport failure, or `error` itself when it is not one.
    `started`: bytes already came from the backend."""
    if isinstance(error, GatewayError):
        return error
    label = LABELS.get(kind, kind)
    if isinstance(error, httpx.ConnectTimeout):  # a deadline like the others: 504 (README, Routing)
        return UpstreamConnectTimeout(f"Timed out connecting to {label} server at {base_url}")
    if isinstance(error, httpx.ConnectError):
        if (code := _os_errno(error)) in OUT_OF_DESCRIPTORS:
            return Unavailable(
                f"The gateway is out of file descriptors and cannot open a connection to {label} server"
                f" at {base_url} ({errno.errorcode[code]}: {os.strerror(code)}); its open-file limit"
                " (ulimit -n) is too low for the load. Retry the request."
            )
        if isinstance(tls := _cause(error, ssl.SSLError), ssl.SSLCertVerificationError):
            return UpstreamUnavailable(
                f"Cannot connect to {label} server at {base_url}: its TLS certificate is not trusted"
                f" ({tls.verify_message}). For a certificate of your own CA, set SSL_CERT_FILE to a"
                " bundle that holds it."
            )
        if tls is not None:
            hint = "; it may not speak TLS: check the scheme" if tls.reason == "WRONG_VERSION_NUMBER" else ""
            return UpstreamUnavailable(
                f"Cannot connect to {label} server at {base_url}: the TLS handshake failed"
                f" ({tls.reason}{hint})"
            )
        return UpstreamUnavailable(f"Cannot connect to {label} server at {base_url}")
    if isinstance(error, httpx.PoolTimeout):
        return UpstreamUnavailable(f"No free connection to {label} server at {base_url}")
    if isinstance(error, httpx.TimeoutException):
        return UpstreamTimeout(f"{label} server at {base_url} timed out")
    if isinstance(error, MalformedAnswer):  # it answered: the request reached it
        return UpstreamProtocol(f"{label} server at {base_url} sent a {error}")
    if isinstance(error, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        if started:
            return UpstreamProtocol(f"{label} server at {base_url} closed the connection mid-stream")
        return UpstreamUnavailable(f"{label} server at {base_url} closed the connection")
    if isinstance(error, LineTooLong):
        return UpstreamProtocol(f"{label} server at {base_url} sent an over-long line")
    if isinstance(error, orjson.JSONDecodeError | UnicodeDecodeError):
        return UpstreamProtocol(f"{label} server at {base_url} sent malformed JSON")
    if isinstance(error, httpx.HTTPError):
        return UpstreamProtocol(f"{label} server at {base_url} failed: {type(error).__name__}")
    return error


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the errors behind it (each client wraps the OS's or ssl's in its own)."""
    cause: BaseException | None = error
    while cause is not None:
        yield cause
        cause = cause.__cause__


def _os_errno(error: BaseException) -> int | None:
    """The errno of the OS error behind a transport failure."""
    return next((cause.errno for cause in _chain(error) if isinstance(cause, OSError) and cause.errno), None)


E = TypeVar("E", bound=BaseException)


def _cause(error: BaseException, kind: type[E]) -> E | None:
    """The innermost error of `kind` in the chain behind a transport failure: the one raised where
    it happened (aiohttp's wrappers of an ssl error are ssl errors too, without its details)."""
    found = [cause for cause in _chain(error) if isinstance(cause, kind)]
    return found[-1] if found else None


class MappedErrors:
    """Map the transport failures raised in its block to the error tree (see `translated`).
    A plain class: `contextlib`'s generator-based managers cost more per request than the mapping."""

    __slots__ = ("base_url", "kind", "started")

    def __init__(self, kind: str, base_url: str, *, started: bool = False) -> None:
        self.kind = kind
        self.base_url = base_url
        self.started = started

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if isinstance(error, Exception):
            mapped = translated(error, self.kind, self.base_url, self.started)
            if mapped is not error:
                try:
                    raise mapped from error
                finally:  # this frame is in `mapped`'s traceback: holding it would be a cycle
                    del mapped


def json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


URL_CACHE_SIZE = 256
USER_AGENT = "phoenix-gateway"
ErrorMapper = Callable[[int, bytes, str, Mapping[str, str]], GatewayError]


P = TypeVar("P")


def _parsed(cache: dict[str, P], url: str, parse: Callable[[str], P]) -> P:
    """`parse(url)`, kept for the next request (up to URL_CACHE_SIZE: paths can hold client-chosen
    model names)."""
    parsed = cache.get(url)
    if parsed is None:
        parsed = parse(url)
        if len(cache) < URL_CACHE_SIZE:
            cache[url] = parsed
    return parsed


class _Answer(Protocol):
    """A backend's answer, whichever client fetched it (`http1.Response`, or httpx's adapted)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes: ...

    def take(self) -> bytes | None:
        """The whole body, the answer closed, when it has all arrived; else None."""
        ...

    def iter_bytes(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class _Httpx:
    """An `httpx.Response` as an _Answer."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        return await self._response.aread()

    def take(self) -> None:
        return None  # an httpx body is read through `read`

    def iter_bytes(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    async def aclose(self) -> None:
        await self._response.aclose()


class Upstream:
    """HTTP to one backend: JSON calls and streamed bodies, every failure mapped to the error tree.

    Requests go straight to the transport as httpx `Request`s: httpx's client layer (URL merging,
    cookies, auth and redirect handling) cost more than the transport itself on the benchmark and
    the gateway needs none of it. `error_from(status, content, model, headers)` turns the
    backend's own error answers into gateway errors; it is the one protocol-specific part.
    """

    def __init__(
        self,
        kind: str,
        base_url: str,
        transport: httpx.AsyncBaseTransport,
        headers: Mapping[str, str],
        *,
        connect_timeout: float,
        error_from: ErrorMapper,
    ) -> None:
        self.kind = kind
        self.base_url = base_url
        self._transport = transport
        self._headers = {"user-agent": USER_AGENT, "accept": "application/json", **headers}
        # Every body sent is JSON, and servers that check (FastAPI's, so vLLM's) refuse one without
        # its type: 422, or 415. A content type from the backend's config stands.
        self._json_headers = (
            self._headers
            if any(k.lower() == "content-type" for k in self._headers)
            else {**self._headers, "content-type": "application/json"}
        )
        self._timeout = request_timeout(connect_timeout)
        self._error_from = error_from
        # URLs parsed once (parsing is a cost per request): for httpx, or for http1
        self._urls: dict[str, httpx.URL] = {}
        self._targets: dict[str, Target] = {}
        self._connect_timeout = connect_timeout
        self._plain: Pool | None = None
        self._parse_target = Target.parse
        if isinstance(transport, GatewayTransport) and base_url.startswith("http://"):
            # A Host header from the config names the server (a virtual host behind a proxy).
            host = next((v for k, v in self._headers.items() if k.lower() == "host"), None)
            try:
                self._head, self._json_head = (
                    encode_headers({k: v for k, v in headers.items() if k.lower() != "host"})
                    for headers in (self._headers, self._json_headers)
                )
                self._parse_target = functools.partial(Target.parse, authority=host)
                self._parse_target(base_url)
                self._plain = transport.plain
            except ValueError:  # a header or URL http1 will not send: httpx says what is wrong
                self._plain = None

    def _url(self, path: str) -> httpx.URL:
        return _parsed(self._urls, self.base_url + path, httpx.URL)

    @classmethod
    def for_backend(
        cls,
        backend: OllamaBackend | OpenAIBackend | GeminiBackend,
        transport: httpx.AsyncBaseTransport,
        auth: Mapping[str, str],
        error_from: ErrorMapper,
    ) -> Upstream:
        """From a backend's config: its type, URL, extra headers and connect timeout, plus auth headers."""
        headers = {**backend.headers, **auth}
        return cls(backend.type, backend.base_url, transport, headers,
                   connect_timeout=backend.timeouts.connect, error_from=error_from)  # fmt: skip

    def _target(self, path: str) -> Target:
        return _parsed(self._targets, self.base_url + path, self._parse_target)

    def _send(self, method: str, path: str, body: Any) -> Awaitable[_Answer]:
        """The answer's head, to await (a plain-http backend's exchange is awaited directly: no
        coroutine of its own between it and the caller)."""
        if self._plain is not None:
            if body is None:
                return self._plain.send(method, self._target(path), self._head, None, self._connect_timeout)
            return self._plain.send(
                method, self._target(path), self._json_head, orjson.dumps(body), self._connect_timeout
            )
        return self._send_httpx(method, path, body)

    async def _send_httpx(self, method: str, path: str, body: Any) -> _Answer:
        return _Httpx(await self._transport.handle_async_request(self._request(method, path, body)))

    def _request(self, method: str, path: str, body: Any) -> httpx.Request:
        content = orjson.dumps(body) if body is not None else None
        return httpx.Request(
            method,
            self._url(path),
            content=content,
            headers=self._headers if content is None else self._json_headers,
            extensions={"timeout": self._timeout},
        )

    async def request(self, method: str, path: str, body: Any = None, model: str = "") -> Any:
        mapping = MappedErrors(self.kind, self.base_url)
        with mapping:
            response = await self._send(method, path, body)
            mapping.started = True  # the backend has answered
            content = response.take()  # no coroutines to read what is here already
            if content is None:
                try:
                    content = await response.read()
                finally:
                    await response.aclose()
            if response.status != 200:
                raise self._error_from(response.status, content, model, response.headers)
            return orjson.loads(content)

    @asynccontextmanager
    async def stream(self, path: str, body: Any, model: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """The response body as it arrives; closing the context closes the upstream connection."""
        with MappedErrors(self.kind, self.base_url):
            response = await self._send("POST", path, body)
        try:
            if response.status != 200:
                with MappedErrors(self.kind, self.base_url):
                    content = await response.read()
                raise self._error_from(response.status, content, model, response.headers)
            # Whatever fails while the caller reads and decodes the body is mapped here.
            with MappedErrors(self.kind, self.base_url, started=True):
                yield response.iter_bytes()
        finally:
            await response.aclose()


def let_end(body: AsyncIterator[bytes]) -> None:
    """The answer in `body` is whole (its end marker came): if the body has not ended yet, it may
    still end within END_GRACE seconds of being closed, and its connection then serves the next
    request, as a server that writes the marker and ends its body in two writes needs; held open
    longer, the connection is closed. For the plain-http client; the others close it at once."""
    if isinstance(body, Response):
        body.let_end(END_GRACE)
