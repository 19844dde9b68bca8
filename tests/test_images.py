"""The fence around image fetching: which addresses are refused, content types, which URLs are
fetched, and how fetched images reach the request builders. Fetches over a socket are in
tests/e2e/test_images.py."""

from __future__ import annotations

import gc
import ipaddress
from typing import Any

import pytest

from gateway import images
from gateway.config import Images
from gateway.errors import InvalidRequest
from gateway.images import GuardedResolver, Image, ImageFetcher, Refused, media_type, refusal, remote_urls
from gateway.providers import gemini, ollama
from gateway.schemas import ChatRequest, Message

PNG = "iVBORw0KGgo="


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "private"),  # "this network"
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("169.254.0.1", "link-local"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "shared (100.64.0.0/10)"),
        ("100.100.100.200", "shared (100.64.0.0/10)"),  # another cloud's metadata
        ("100.127.255.255", "shared (100.64.0.0/10)"),
        ("198.18.0.1", "private"),  # benchmarking
        ("192.0.2.1", "private"),  # documentation
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "private"),
        ("255.255.255.255", "private"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("fd00:ec2::254", "private"),  # AWS metadata over IPv6
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "private"),  # documentation
        ("2001::1", "private"),  # Teredo
        ("::7f00:1", "reserved"),  # IPv4-compatible, deprecated
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:7f00:1", "loopback"),
        ("::ffff:10.1.2.3", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("::ffff:100.64.0.1", "shared (100.64.0.0/10)"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 of 169.254.169.254
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ],
)
def test_addresses_outside_the_public_internet_are_refused_with_their_kind(address: str, kind: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.215.14",
        "100.63.255.255",  # just below the shared range
        "100.128.0.0",  # just above it
        "172.32.0.1",  # just above 172.16/12
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "2002:808:808::1",  # 6to4 of a public address
        "64:ff9b::808:808",  # NAT64 of a public address: how IPv6-only hosts reach IPv4 sites
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("image/png", "image/png"),
        ("image/PNG", "image/png"),
        ("image/jpeg; charset=binary", "image/jpeg"),
        ("  image/webp ;q=1", "image/webp"),
        ('image/gif; name="a;b"', "image/gif"),
        ("", ""),
        (None, ""),
    ],
)
def test_media_type_drops_parameters_and_case(header: str | None, expected: str) -> None:
    assert media_type(header) == expected


def _message(role: str, *urls: str) -> Message:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return Message.model_validate({"role": role, "content": [{"type": "text", "text": "look"}, *parts]})


def test_remote_urls_are_the_distinct_http_urls_with_their_first_field_and_the_parts_holding_one() -> None:
    messages = [
        _message("user", "https://img.example/a.png", f"data:image/png;base64,{PNG}"),
        _message("user", "http://img.example/b.png", "https://img.example/a.png"),
        _message("user", "ftp://img.example/c.png", "HTTPS://img.example/d.png", "file:///etc/passwd"),
    ]
    assert remote_urls(messages) == (
        {
            "https://img.example/a.png": "messages[0].content[1].image_url.url",
            "http://img.example/b.png": "messages[1].content[1].image_url.url",
            "HTTPS://img.example/d.png": "messages[2].content[2].image_url.url",
        },
        4,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["localhost", "127.1", "0x7f.0.0.1", "2130706433"])
async def test_the_resolver_refuses_names_by_what_they_resolve_to(host: str) -> None:
    with pytest.raises(Refused, match=r"^the image host .* does not resolve to a public address$"):
        await GuardedResolver(allow_private_networks=False).resolve(host, 80)


@pytest.mark.anyio
async def test_the_resolver_returns_what_it_checked_when_private_networks_are_allowed() -> None:
    results = await GuardedResolver(allow_private_networks=True).resolve("127.1", 80)
    assert [(r["host"], r["port"]) for r in results] == [("127.0.0.1", 80)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:9/cat.png", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::ffff:127.0.0.1]:9/", "loopback"),
        ("http://[fe80::1%25eth0]/", "link-local"),
        ("http://10.0.0.1/", "private"),
    ],
)
async def test_ip_literals_are_refused_before_any_connection(url: str, words: str) -> None:
    # Port 9 (discard) on loopback: nothing listens, so a connection would fail differently.
    with pytest.raises(InvalidRequest, match=words) as caught:
        await ImageFetcher(Images()).fetch(
            [_message("user", "https://img.example/ok.png"), _message("user", url)]
        )
    assert caught.value.param == "messages[1].content[1].image_url.url"
    assert "allow_private_networks" in caught.value.message


@pytest.mark.anyio
async def test_nothing_is_fetched_when_fetching_is_off() -> None:
    assert await ImageFetcher(Images(fetch=False)).fetch([_message("user", "http://127.0.0.1:9/")]) == {}


def _request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", **fields})


URL = "https://img.example/cat.png?sig=secret"
FETCHED = {URL: Image("image/webp", PNG)}


def test_a_requests_fetched_images_are_kept_while_it_lives_and_no_longer() -> None:
    # A retry or fallback on another backend (another fetcher) finds them; a freed request's go.
    request, other = _request(messages=[_message("user", URL)]), _request(messages=[_message("user", URL)])
    images._fetched_for(request).update(FETCHED)
    assert images._fetched_for(request) == FETCHED
    assert images._fetched_for(other) == {}
    del request, other
    gc.collect()
    assert images._FETCHED == {}


def test_ollama_sends_fetched_images_as_bare_base64() -> None:
    request = _request(messages=[_message("user", URL, f"data:image/png;base64,{PNG}")])
    body = ollama.build_request(request, "llava", stream=False, images=FETCHED)
    assert body["messages"][0]["images"] == [PNG, PNG]


def test_gemini_sends_fetched_images_as_inline_data_with_the_hosts_content_type() -> None:
    request = _request(messages=[_message("user", URL)])
    parts = gemini.build_request(request, "gemini-2.5-flash", images=FETCHED)["contents"][0]["parts"]
    assert parts == [{"text": "look"}, {"inlineData": {"mimeType": "image/webp", "data": PNG}}]


@pytest.mark.parametrize(
    "build",
    [
        lambda request: ollama.build_request(request, "llava", stream=False),
        lambda request: gemini.build_request(request, "gemini-2.5-flash"),
    ],
    ids=["ollama", "gemini"],
)
def test_an_image_url_that_was_not_fetched_is_refused(build: Any) -> None:
    with pytest.raises(InvalidRequest, match="base64 data URL") as caught:
        build(_request(messages=[_message("user", URL)]))
    assert caught.value.param == "messages[0].content[1].image_url.url"
