"""Image URLs through the real gateway: fetched for Ollama and Gemini from a real image server on
loopback, within the size, time and content-type limits, and never from loopback, link-local or
private addresses unless `images.allow_private_networks` says so. The image server is on 127.0.0.1,
so the tests that fetch allow private networks, and the refusal tests keep the default."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from yarl import URL

from gateway.config import parse_config
from gateway.images import ImageFetcher
from tests.e2e.conftest import ollama_config, sample, scrape
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, serve

pytestmark = pytest.mark.e2e
FakeServer = tuple[FakeOllama, ServerThread]
LIMIT = 4096  # images.max_bytes in these tests
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8  # 2056 bytes, under the limit
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(255, -1, -1)) * 4
KEY = "sk-test-0123456789"
SECRET = "sig=do-not-log-me"
FETCHING = {"allow_private_networks": True, "max_bytes": LIMIT, "timeout": 5.0}


class ImageHost:
    """A real HTTP server with images and misbehaving variants; it records every path it is asked
    for, and sets events when a client leaves a body it never finished."""

    def __init__(self) -> None:
        self.url = ""
        self.paths: list[str] = []
        self.targets: list[bytes] = []  # the request targets as they came, escapes and all
        self.endless_closed = threading.Event()  # the endless body's generator was closed
        self.hang_left = threading.Event()  # the client of /hang.png went away
        self._pair: asyncio.Event | None = None
        self._pair_arrived = 0
        self.app = Starlette(routes=[Route("/{name:path}", self.serve)])

    async def serve(self, request: Request) -> Response:
        self.paths.append(request.url.path)
        self.targets.append(request.scope["raw_path"] + b"?" + request.scope["query_string"])
        name = request.path_params["name"]
        if name == "cat.png":
            return Response(PNG, media_type="image/png")
        if name == "slow.png":
            await asyncio.sleep(1.2)
            return Response(PNG, media_type="image/png")
        if name == "cat.jpg":
            return Response(JPEG, headers={"content-type": "image/jpeg; charset=binary"})
        if name == "big.png":
            return Response(b"\0" * (LIMIT + 1), media_type="image/png")  # with Content-Length
        if name == "endless.png":
            return StreamingResponse(self._endless(), media_type="image/png")  # chunked, no length
        if name == "page.html":
            return Response(b"<html>not an image</html>", media_type="text/html")
        if name == "hang.png":
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.hang_left.set()
            return Response(b"")
        if name == "redirect":
            return RedirectResponse(request.query_params["to"], status_code=302)
        if name == "loop":
            return RedirectResponse("/loop", status_code=307)
        if name.startswith("pair/"):
            return await self._one_of_a_pair()
        return Response(b"no such image", status_code=404, media_type="text/plain")

    async def _endless(self) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"\0" * 1024
                await asyncio.sleep(0)
        finally:
            self.endless_closed.set()

    async def _one_of_a_pair(self) -> Response:
        """Answers only once both images of the pair were asked for: fetched one after the other,
        the first one fails."""
        if self._pair is None:
            self._pair = asyncio.Event()
        self._pair_arrived += 1
        if self._pair_arrived == 2:
            self._pair.set()
        try:
            await asyncio.wait_for(self._pair.wait(), 3)
        except TimeoutError:
            return Response(b"the other image was not asked for", status_code=503)
        return Response(PNG, media_type="image/png")


@pytest.fixture
def host() -> Iterator[ImageHost]:
    image_host = ImageHost()
    with serve(image_host.app) as server:
        image_host.url = server.url
        yield image_host


@dataclass
class Rig:
    fake: FakeOllama
    gateway: ServerThread
    host: ImageHost

    def chat(self, *urls: str, stream: bool = False, text: str = "What is this?") -> httpx.Response:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        body = {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}],
            "stream": stream,
        }
        return httpx.post(self.gateway.url + "/v1/chat/completions", json=body, timeout=20)

    def refused(self, response: httpx.Response, *words: str) -> str:
        """The error message of a 400 that names the image's field and says `words`."""
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "messages[0].content[1].image_url.url"
        for word in words:
            assert word in error["message"]
        assert SECRET not in response.text
        assert not self.fake.chat_bodies(), "nothing may reach the backend"
        return str(error["message"])


@pytest.fixture
def rig_for(
    fake_ollama: FakeServer, start_gateway: Callable[..., ServerThread], host: ImageHost
) -> Callable[..., Rig]:
    """`rig_for(**images)`: a gateway in front of the fake Ollama with these `images:` settings."""

    def make(**images: Any) -> Rig:
        fake, server = fake_ollama
        return Rig(fake, start_gateway(ollama_config(server.url, images=images)), host)

    return make


@pytest.fixture
def rig(rig_for: Callable[..., Rig]) -> Rig:
    return rig_for(**FETCHING)


def test_an_image_url_reaches_ollama_as_the_exact_base64_of_its_bytes(rig: Rig) -> None:
    url = f"{rig.host.url}/cat.png?{SECRET}"
    with openai.OpenAI(base_url=rig.gateway.url + "/v1", api_key="client", max_retries=0) as api:
        reply = api.chat.completions.create(
            model="llama3.2",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
        )
    assert reply.choices[0].message.content == "Hello there!"
    [sent] = rig.fake.chat_bodies()
    assert sent["messages"] == [
        {"role": "user", "content": "What is this?", "images": [base64.b64encode(PNG).decode()]}
    ]
    assert rig.host.paths == ["/cat.png"]


def test_the_same_url_twice_is_fetched_once(rig: Rig) -> None:
    url = f"{rig.host.url}/cat.png"
    parts = [{"type": "image_url", "image_url": {"url": url}}] * 2
    body = {
        "model": "llama3.2",
        "messages": [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": "Two cats."},
            {"role": "user", "content": [{"type": "text", "text": "And this?"}, parts[0]]},
        ],
    }
    response = httpx.post(rig.gateway.url + "/v1/chat/completions", json=body, timeout=20)
    assert response.status_code == 200, response.text
    encoded = base64.b64encode(PNG).decode()
    images = [message.get("images") for message in rig.fake.chat_bodies()[0]["messages"]]
    assert images == [[encoded, encoded], None, [encoded]]
    assert rig.host.paths == ["/cat.png"]


def test_the_images_of_one_request_are_fetched_concurrently(rig: Rig) -> None:
    response = rig.chat(f"{rig.host.url}/pair/a.png", f"{rig.host.url}/pair/b.png")
    assert response.status_code == 200, response.text
    assert sorted(rig.host.paths) == ["/pair/a.png", "/pair/b.png"]
    assert len(rig.fake.chat_bodies()[0]["messages"][0]["images"]) == 2


def test_a_redirect_is_followed_and_checked_again(rig: Rig) -> None:
    response = rig.chat(f"{rig.host.url}/redirect?to=/cat.png")
    assert response.status_code == 200, response.text
    assert rig.fake.chat_bodies()[0]["messages"][0]["images"] == [base64.b64encode(PNG).decode()]
    assert rig.host.paths == ["/redirect", "/cat.png"]


def test_an_image_url_is_fetched_as_written_escapes_and_all(rig: Rig) -> None:
    """A signed URL's signature covers its bytes: `%2F` must not become `/` on the way."""
    signed = "/cat.png?sig=a%2Fb%2B%3D&exp=%7E1&x=1+2"
    assert rig.chat(rig.host.url + signed).status_code == 200
    redirect = "/redirect?to=/cat.png%3Fsig%3Dc%252Fd"  # Location: /cat.png?sig=c%2Fd
    assert rig.chat(rig.host.url + redirect).status_code == 200
    spaced = "/cat.png?name=a b&who=\u00e9"  # not a URI as written: escaped first
    assert rig.chat(rig.host.url + spaced).status_code == 200
    assert rig.host.targets == [
        signed.encode(),
        redirect.encode(),
        b"/cat.png?sig=c%2Fd",
        b"/cat.png?name=a+b&who=%C3%A9",  # yarl writes a space in a query as +
    ]


def test_more_than_three_redirects_are_refused(rig: Rig) -> None:
    rig.refused(rig.chat(f"{rig.host.url}/loop"), "redirected more than 3 times")
    assert rig.host.paths == ["/loop"] * 4


def test_an_image_larger_than_the_limit_by_content_length_is_refused(rig: Rig) -> None:
    rig.refused(rig.chat(f"{rig.host.url}/big.png?{SECRET}"), f"{LIMIT + 1} bytes", f"limit of {LIMIT}")


def test_an_endless_image_without_content_length_is_cut_off_at_the_limit(rig: Rig) -> None:
    rig.refused(rig.chat(f"{rig.host.url}/endless.png"), f"larger than the limit of {LIMIT} bytes")
    assert rig.host.endless_closed.wait(5), "the gateway kept the endless download open"


def test_a_content_type_not_in_the_list_is_refused(rig: Rig) -> None:
    message = rig.refused(rig.chat(f"{rig.host.url}/page.html"), "'text/html'", "image/png, image/jpeg")
    assert "127.0.0.1" in message  # the host, never the path


def test_an_image_host_error_status_is_refused_with_the_status(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.refused(rig.chat(f"{rig.host.url}/missing.png?{SECRET}"), "HTTP 404")
    logged = capsys.readouterr()
    assert "answered HTTP 404" in logged.err + logged.out  # the failure was logged, ...
    assert SECRET not in logged.err + logged.out  # ... without the URL's query string


def test_an_image_host_that_hangs_is_given_up_after_the_timeout(rig_for: Callable[..., Rig]) -> None:
    rig = rig_for(**{**FETCHING, "timeout": 0.5})
    rig.refused(rig.chat(f"{rig.host.url}/hang.png"), "did not arrive within 0.5 s")
    assert rig.host.hang_left.wait(5), "the gateway kept the hanging connection open"


def test_a_stream_with_a_bad_image_is_a_400_before_any_event(rig: Rig) -> None:
    response = rig.chat(f"{rig.host.url}/missing.png", stream=True)
    rig.refused(response, "HTTP 404")
    assert "data:" not in response.text


def test_a_streamed_answer_gets_its_image_too(rig: Rig) -> None:
    response = rig.chat(f"{rig.host.url}/cat.png", stream=True)
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")
    assert rig.fake.chat_bodies()[0]["messages"][0]["images"] == [base64.b64encode(PNG).decode()]


NOT_PUBLIC = "does not resolve to a public address"  # a name's refusal does not say what it resolves to


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://localhost:{port}/cat.png", NOT_PUBLIC),  # a name that resolves to loopback
        ("http://127.0.0.1:{port}/cat.png", "loopback address"),
        ("http://[::ffff:127.0.0.1]:{port}/cat.png", "loopback address"),
        ("http://0x7f.0.0.1:{port}/cat.png", NOT_PUBLIC),  # resolved by getaddrinfo to 127.0.0.1
    ],
)
def test_loopback_is_refused_by_default_and_never_asked(
    rig_for: Callable[..., Rig], url: str, why: str
) -> None:
    rig = rig_for()
    image_url = url.format(port=URL(rig.host.url).port)
    rig.refused(rig.chat(image_url), why, "allow_private_networks")
    assert rig.host.paths == []


def test_fetching_off_keeps_refusing_image_urls(rig_for: Callable[..., Rig]) -> None:
    rig = rig_for(**{**FETCHING, "fetch": False})
    rig.refused(rig.chat(f"{rig.host.url}/cat.png"), "base64 data URL")
    assert rig.host.paths == []


@pytest.mark.parametrize(
    ("to", "words"),
    [
        ("http://localhost:{port}/cat.png", "the image host localhost does not resolve to a public address"),
        ("http://127.0.0.1:{port}/cat.png", "loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "link-local address"),
        ("file:///etc/passwd", "not an http(s) URL"),
    ],
)
def test_a_redirect_to_a_refused_address_is_refused(
    rig_for: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch, to: str, words: str
) -> None:
    # The image host is on loopback, which the default refuses; let its /redirect through as if it
    # were a public host, and nothing else.
    check = ImageFetcher._check

    def first_hop_public(fetcher: ImageFetcher, target: URL, param: str) -> None:
        if target.path != "/redirect":
            check(fetcher, target, param)

    monkeypatch.setattr(ImageFetcher, "_check", first_hop_public)
    rig = rig_for()
    target = to.format(port=URL(rig.host.url).port)
    rig.refused(rig.chat(f"{rig.host.url}/redirect?to={target}"), words)
    assert rig.host.paths == ["/redirect"]


def _backend_config(kind: str, url: str) -> Any:
    if kind == "gemini":
        backend = {"name": "b", "type": "gemini", "base_url": url + "/v1beta", "api_key_env": "FAKE_KEY"}
        model = "gemini-2.5-flash"
    else:
        backend = {"name": "b", "type": "openai", "base_url": url + "/v1", "api_key_env": "FAKE_KEY"}
        model = "gpt-4o-mini"
    models = [{"name": "chat", "deployments": [{"backend": "b", "model": model}]}]
    return parse_config({"backends": [backend], "models": models, "images": FETCHING}, "test")


def _ask(gateway: ServerThread, url: str, *, stream: bool) -> None:
    image = {"type": "image_url", "image_url": {"url": url}}
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What?"}, image]},
    ]
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="client", max_retries=0) as api:
        if stream:
            chunks = api.chat.completions.create(model="chat", messages=messages, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            assert api.chat.completions.create(model="chat", messages=messages).choices[0].message.content


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_gemini_receives_inline_data_with_the_hosts_content_type(
    start_gateway: Callable[..., ServerThread], host: ImageHost, stream: bool
) -> None:
    fake = FakeGemini(api_key=KEY)
    with serve(fake.app) as upstream:
        gateway = start_gateway(_backend_config("gemini", upstream.url), environ={"FAKE_KEY": KEY})
        _ask(gateway, f"{host.url}/cat.jpg?{SECRET}", stream=stream)
    [sent] = fake.chat_bodies()
    assert sent["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "What?"},
                {"inlineData": {"mimeType": "image/jpeg", "data": base64.b64encode(JPEG).decode()}},
            ],
        }
    ]
    assert host.paths == ["/cat.jpg"]


def test_an_openai_backend_receives_the_url_unchanged_and_nothing_is_fetched(
    start_gateway: Callable[..., ServerThread], host: ImageHost
) -> None:
    fake = FakeOpenAI(api_key=KEY)
    url = f"{host.url}/cat.png?{SECRET}"
    with serve(fake.app) as upstream:
        gateway = start_gateway(_backend_config("openai", upstream.url), environ={"FAKE_KEY": KEY})
        _ask(gateway, url, stream=False)
    [sent] = fake.chat_bodies()
    assert sent["messages"][1]["content"][1] == {"type": "image_url", "image_url": {"url": url}}
    assert host.paths == []


def test_a_retry_reuses_the_fetched_image_and_the_fetch_is_outside_the_backends_deadline(
    start_gateway: Callable[..., ServerThread], host: ImageHost
) -> None:
    broken, working = FakeOllama(), FakeOllama()
    broken.default = Reply(status=500, error_text="boom")
    with serve(broken.app) as a, serve(working.app) as b:
        quick = {"first_token": 1.0}  # shorter than the image host's 1.2 s
        config = parse_config(
            {
                "backends": [
                    {"name": "a", "type": "ollama", "base_url": a.url, "timeouts": quick},
                    {"name": "b", "type": "ollama", "base_url": b.url, "timeouts": quick},
                ],
                "models": [{"name": "llama3.2", "deployments": [{"backend": "a"}, {"backend": "b"}]}],
                "routing": {"strategy": "round_robin"},
                "images": FETCHING,
            },
            "test",
        )
        rig = Rig(working, start_gateway(config), host)
        answers = [rig.chat(f"{host.url}/slow.png") for _ in range(2)]  # one of them starts on `a`
    assert [answer.status_code for answer in answers] == [200, 200], answers[-1].text
    assert [answer.headers["x-phoenix-backend"] for answer in answers] == ["b", "b"]
    assert len(broken.chat_bodies()) >= 1, "no request was retried: the test proves nothing"
    encoded = base64.b64encode(PNG).decode()
    sent = broken.chat_bodies() + working.chat_bodies()
    assert all(body["messages"][0]["images"] == [encoded] for body in sent)
    assert host.paths == ["/slow.png", "/slow.png"]  # once per request, not once per attempt


def test_more_image_urls_than_allowed_are_refused_before_any_fetch_repeats_counted(
    rig_for: Callable[..., Rig],
) -> None:
    rig = rig_for(**FETCHING, max_per_request=3)
    cat, jpg = f"{rig.host.url}/cat.png", f"{rig.host.url}/cat.jpg"
    assert rig.chat(cat, jpg, cat).status_code == 200  # three parts, two distinct URLs
    # one URL more, or the same again: each part would carry the image to the backend
    response = rig.chat(cat, jpg, cat, cat)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert "4 image URLs (2 distinct)" in error["message"]
    assert "at most 3 per request (images.max_per_request)" in error["message"]
    assert sorted(rig.host.paths) == ["/cat.jpg", "/cat.png"]  # the refused request fetched nothing
    assert len(rig.fake.chat_bodies()) == 1


def test_a_name_that_does_not_resolve_and_one_that_resolves_privately_are_refused_alike(
    rig_for: Callable[..., Rig],
) -> None:
    """Clients may not use the refusals to learn which internal names exist."""
    rig = rig_for()
    port = URL(rig.host.url).port
    private = rig.refused(rig.chat(f"http://localhost:{port}/cat.png"))
    unknown = rig.refused(rig.chat("http://no-such-host.invalid/cat.png"))
    assert private.replace("localhost", "HOST") == unknown.replace("no-such-host.invalid", "HOST")
    assert "images.allow_private_networks" in unknown
    assert rig.host.paths == []


INVALID_URL = "the image URL is not a valid http(s) URL"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://a..b/x.png", INVALID_URL),  # a name IDNA cannot encode for the resolver
        (f"http://{'a' * 64}.example/x.png", INVALID_URL),
        ("http://xn--zz/x.png", "the image host xn--zz could not be resolved"),  # asked as written
    ],
    ids=["empty-label", "label-over-63", "bad-punycode"],
)
def test_a_malformed_host_name_is_a_400_naming_the_part(
    rig_for: Callable[..., Rig], url: str, message: str
) -> None:
    rig = rig_for(**FETCHING)
    response = rig.chat(url)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url.url"
    assert error["message"] == message


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_time_spent_fetching_an_image_is_not_the_gateway_s_overhead(
    rig_for: Callable[..., Rig], stream: bool
) -> None:
    rig = rig_for(**FETCHING)
    assert rig.chat(f"{rig.host.url}/slow.png", stream=stream).status_code == 200  # its host takes 1.2 s
    samples = scrape(rig.gateway.url)
    assert sample(samples, "gateway_overhead_seconds_count", endpoint="chat") == 1
    # less than the fetch alone took (1.2 s): it is a wait on another server, as the backend's is
    assert sample(samples, "gateway_overhead_seconds_sum", endpoint="chat") < 1.0
