"""Fetching http(s) image URLs for backends that take only inline bytes (Ollama, Gemini).

A client's image URL makes the gateway open a connection wherever the URL points, so every fetch is
fenced in (`images:` in the config):
- Only http and https. Every address a host name resolves to is checked, and the connection goes to
  those checked addresses only: `GuardedResolver` is the connector's resolver, so there is no second
  lookup a rebinding DNS server could answer differently, while the Host header and TLS SNI keep the
  name. IP literals never reach a resolver in aiohttp; they are checked before each request.
  Loopback, link-local (cloud metadata at 169.254.169.254), private, shared (100.64/10), reserved,
  multicast and unspecified addresses are refused, also inside IPv4-mapped, 6to4 and NAT64 IPv6
  forms, unless `allow_private_networks`.
- At most `MAX_REDIRECTS` redirects, each hop checked the same way.
- A size cap (Content-Length first, then the bytes as they arrive), one deadline for each image's
  whole fetch (redirects included), and an allowed list of content types. Compressed bodies are not
  asked for, and refused.
- Each failure is a 400 naming `messages[i].content` and the reason. Messages and logs name the host
  at most, never the path or query string (a signed URL's token lives there).

One request's images are fetched concurrently (at most `FETCHES_AT_ONCE`), each distinct URL once,
over a session of their own that closes when they are done: nothing is shared with the backend pool,
and nothing outlives the request.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import string
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

import aiohttp
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from gateway.config import Images
from gateway.errors import InvalidRequest
from gateway.schemas import ChatRequest, ImagePart, Message

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SCHEMES = ("http", "https")
MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
FETCHES_AT_ONCE = 8  # per request: a message full of URLs must not become a flood of connections
USER_AGENT = "phoenix-gateway (image fetch)"
# What a URI may hold as it is (RFC 3986): a URL of only these goes out as written, its escapes
# kept (a signed URL's `%2F` stays `%2F`); one with anything else (a space, a letter outside
# ASCII) is escaped first.
URI_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;=%")
PRIVATE_HINT = "the gateway does not fetch images from private networks (images.allow_private_networks)"

SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT; Python counts it neither way
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the last 32 bits are an IPv4 address
# Why an address is refused, first match wins; anything not global is refused in the end.
REFUSED: list[tuple[str, Callable[[IPAddress], bool]]] = [
    ("unspecified", lambda a: a.is_unspecified),
    ("loopback", lambda a: a.is_loopback),
    ("link-local", lambda a: a.is_link_local),
    ("multicast", lambda a: a.is_multicast),
    ("shared (100.64.0.0/10)", lambda a: a in SHARED),
    ("private", lambda a: a.is_private),
    ("site-local", lambda a: isinstance(a, ipaddress.IPv6Address) and a.is_site_local),
    ("reserved", lambda a: a.is_reserved),
    ("non-global", lambda a: not a.is_global),
]


@dataclass(frozen=True, slots=True)
class Image:
    mime: str  # the media type the image host declared, without parameters
    data: str  # base64 of the bytes


NO_IMAGES: Mapping[str, Image] = MappingProxyType({})
# The images fetched for each request under way, by the request's id, so that a retry or a fallback
# on another backend (another fetcher) fetches nothing twice. Only requests with image URLs have an
# entry, and it goes when the request is freed.
_FETCHED: dict[int, dict[str, Image]] = {}


def _fetched_for(request: ChatRequest) -> dict[str, Image]:
    key = id(request)
    fetched = _FETCHED.get(key)
    if fetched is None:
        fetched = _FETCHED[key] = {}
        weakref.finalize(request, _FETCHED.pop, key, None)
    return fetched


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), which is where it leads."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress) -> str | None:
    """The kind of address this is when the gateway must not connect to it, else None."""
    address = embedded_ipv4(address) or address
    return next((kind for kind, test in REFUSED if test(address)), None)


def not_public(host: str) -> str:
    """Why a host name is refused, the same whether it resolves to a private address or to none."""
    return f"the image host {host} does not resolve to a public address"


def media_type(content_type: str | None) -> str:
    """`image/PNG; charset=x` -> `image/png`; an absent header -> ``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def remote_urls(messages: Sequence[Message]) -> tuple[dict[str, str], int]:
    """Each distinct http(s) image URL of the messages (only a user's may hold images), with the
    field that holds it first; and how many parts hold one, a URL repeated counting each time."""
    found: dict[str, str] = {}
    parts = 0
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if isinstance(part, ImagePart) and part.url.split(":", 1)[0].lower() in SCHEMES:
                found.setdefault(part.url, f"messages[{i}].content[{j}].{part.url_field}")
                parts += 1
    return found, parts


async def images_for(fetcher: ImageFetcher | None, request: ChatRequest) -> Mapping[str, Image]:
    """The request's fetched images, for a provider that takes them inline (None: it fetches none).
    When the dispatcher prepared the request (`Provider.prepare`), they are all known already."""
    fetching = None if fetcher is None else fetcher.for_request(request)
    return NO_IMAGES if fetching is None else await fetching


class Refused(Exception):
    """A host that resolves to an address the gateway does not connect to."""


class GuardedResolver(ThreadedResolver):
    """Resolves with getaddrinfo, like aiohttp's default, and refuses the whole host when any of its
    addresses is refused: what it returns is what the connector connects to."""

    def __init__(self, allow_private_networks: bool) -> None:
        super().__init__()
        self._allow = allow_private_networks

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await super().resolve(host, port, family)
        if not self._allow:
            for result in results:
                kind = refusal(ipaddress.ip_address(result["host"]))
                if kind is not None:
                    raise Refused(not_public(host))
        return results


class ImageFetcher:
    """Turns a request's http(s) image URLs into inline images, within `images:`'s limits."""

    def __init__(self, config: Images) -> None:
        self.config = config

    async def fetch(
        self,
        messages: Sequence[Message],
        known: Mapping[str, Image] = NO_IMAGES,
    ) -> Mapping[str, Image]:
        """url -> image for every http(s) image URL in the messages that is not `known` already;
        {} when fetching is off (the provider then refuses such URLs as before). More image URLs
        than `max_per_request`, or the first failure, fail the request. A URL is fetched once, but
        each part that repeats it carries the image to the backend again: repeats count."""
        wanted, parts = remote_urls(messages)
        if parts > self.config.max_per_request:
            raise InvalidRequest(
                f"the request holds {parts} image URLs ({len(wanted)} distinct); the gateway takes at"
                f" most {self.config.max_per_request} per request (images.max_per_request), a URL"
                " repeated counting each time, as each goes to the backend",
                param="messages",
            )
        return await self._fetch_all({url: param for url, param in wanted.items() if url not in known})

    def for_request(self, request: ChatRequest) -> Awaitable[Mapping[str, Image]] | None:
        """What to await for the request's images, fetched at most once per request (kept for a
        retry or a fallback); None when it holds no image URL (one pass over its messages, and no
        coroutine to create and run for the requests that have none)."""
        for message in request.messages:
            if isinstance(message.content, list) and message.image_urls():
                return self._for_request(request)
        return None

    async def _for_request(self, request: ChatRequest) -> Mapping[str, Image]:
        fetched = _fetched_for(request)
        fetched.update(await self.fetch(request.messages, known=fetched))
        return fetched

    async def _fetch_all(self, wanted: Mapping[str, str]) -> Mapping[str, Image]:
        if not wanted or not self.config.fetch:
            return NO_IMAGES
        slots = asyncio.Semaphore(FETCHES_AT_ONCE)
        async with self._session() as session:
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = {url: group.create_task(self._one(session, slots, url, param))
                             for url, param in wanted.items()}  # fmt: skip
            except ExceptionGroup as failures:  # the others were cancelled: report the first
                raise failures.exceptions[0] from None
        return {url: task.result() for url, task in tasks.items()}

    def _session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.config.allow_private_networks), use_dns_cache=False
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(),  # no aiohttp deadlines: asyncio.timeout covers the fetch
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # an environment proxy would connect to addresses nobody checked
            headers={"user-agent": USER_AGENT, "accept": ", ".join(self.config.content_types)},
            skip_auto_headers=("Accept-Encoding",),
        )

    async def _one(
        self, session: aiohttp.ClientSession, slots: asyncio.Semaphore, url: str, param: str
    ) -> Image:
        try:
            target = _parsed(url)
        except ValueError:
            raise InvalidRequest("the image URL is not a valid http(s) URL", param=param) from None
        async with slots:  # the deadline starts once the fetch may start
            try:
                async with asyncio.timeout(self.config.timeout):
                    return await self._follow(session, target, param)
            except TimeoutError:
                raise InvalidRequest(
                    f"the image at {target.raw_host} did not arrive within {self.config.timeout:g} s",
                    param=param,
                ) from None

    async def _follow(self, session: aiohttp.ClientSession, target: URL, param: str) -> Image:
        for _ in range(MAX_REDIRECTS + 1):
            self._check(target, param)
            with _reasons(target.raw_host or "", param, self.config.allow_private_networks):
                async with session.get(target, allow_redirects=False) as response:
                    if response.status not in REDIRECTS:
                        return await self._read(response, target.raw_host or "", param)
                    location = response.headers.get("location")
                    if not location:
                        raise InvalidRequest(
                            f"the image host {target.raw_host} redirected without a Location", param=param
                        )
                    try:
                        target = response.url.join(_parsed(location))
                    except ValueError:
                        raise InvalidRequest(
                            f"the image host {target.raw_host} redirected to an invalid URL", param=param
                        ) from None
        raise InvalidRequest(f"the image URL redirected more than {MAX_REDIRECTS} times", param=param)

    def _check(self, target: URL, param: str) -> None:
        """What aiohttp does not send through the resolver: the scheme, and IP literals."""
        if target.scheme not in SCHEMES or not target.raw_host:
            raise InvalidRequest("the image URL (or a redirect) is not an http(s) URL", param=param)
        try:
            address = ipaddress.ip_address(target.raw_host)
        except ValueError:
            return  # a name: the resolver checks what it resolves to
        kind = refusal(address)
        if kind is not None and not self.config.allow_private_networks:
            raise InvalidRequest(f"the image URL points to a {kind} address; {PRIVATE_HINT}", param=param)

    async def _read(self, response: aiohttp.ClientResponse, host: str, param: str) -> Image:
        limit = self.config.max_bytes
        if response.status != 200:
            raise InvalidRequest(f"the image host {host} answered HTTP {response.status}", param=param)
        mime = media_type(response.headers.get("content-type"))
        if mime not in {media_type(allowed) for allowed in self.config.content_types}:
            raise InvalidRequest(
                f"the image at {host} has content type {mime or 'none'!r}; allowed are"
                f" {', '.join(self.config.content_types)}",
                param=param,
            )
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise InvalidRequest(f"the image at {host} came compressed ({encoding})", param=param)
        if response.content_length is not None and response.content_length > limit:
            raise InvalidRequest(
                f"the image at {host} is {response.content_length} bytes, more than the limit of {limit}",
                param=param,
            )
        body = bytearray()
        async for piece in response.content.iter_any():
            body += piece
            if len(body) > limit:
                response.close()  # stop the download: the connection goes, not back to the pool
                raise InvalidRequest(
                    f"the image at {host} is larger than the limit of {limit} bytes", param=param
                )
        return Image(mime, base64.b64encode(body).decode("ascii"))


def _parsed(url: str) -> URL:
    return URL(url, encoded=True) if URI_CHARACTERS.issuperset(url) else URL(url)


@contextmanager
def _reasons(host: str, param: str, allow_private_networks: bool) -> Iterator[None]:
    """aiohttp's failures, as what they mean for the client; never a stack trace or the URL.
    Where private networks are refused, a name that does not resolve is refused in the words of
    one that resolves to a private address, so that clients cannot probe the internal DNS."""
    try:
        yield
    except TimeoutError:
        raise  # the deadline's own: reported as such by the caller
    except Refused as refused:
        raise InvalidRequest(f"{refused}; {PRIVATE_HINT}", param=param) from None
    except aiohttp.ClientConnectorDNSError:
        if not allow_private_networks:
            raise InvalidRequest(f"{not_public(host)}; {PRIVATE_HINT}", param=param) from None
        raise InvalidRequest(f"the image host {host} could not be resolved", param=param) from None
    except aiohttp.ClientConnectorCertificateError:
        raise InvalidRequest(f"the image host {host} has no valid TLS certificate", param=param) from None
    except aiohttp.ClientConnectorError:
        raise InvalidRequest(f"the image host {host} could not be reached", param=param) from None
    except (aiohttp.InvalidURL, UnicodeError):  # UnicodeError: a host name IDNA cannot encode (a..b)
        raise InvalidRequest("the image URL is not a valid http(s) URL", param=param) from None
    except (aiohttp.ClientError, OSError):
        raise InvalidRequest(f"the image host {host} broke off or garbled its answer", param=param) from None
