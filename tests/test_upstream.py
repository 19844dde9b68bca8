"""What `Upstream` puts on the wire, through each of the clients it may use."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping

import anyio
import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import GatewayError, Unavailable, UpstreamProtocol
from gateway.transport import AiohttpTransport
from gateway.upstream import GatewayTransport, Upstream
from tests.servers import ServerThread, no_free_descriptors, serve

pytestmark = pytest.mark.anyio


async def echo(request: Request) -> Response:
    """The request's content type and body, as the backend saw them."""
    seen = {"content_type": request.headers.get("content-type"), "body": (await request.body()).decode()}
    return Response(orjson.dumps(seen), media_type="application/json")


async def slow(request: Request) -> Response:
    await anyio.sleep(0.6)
    return Response(b"{}", media_type="application/json")


@pytest.fixture(scope="module")
def backend() -> Iterator[ServerThread]:
    routes = [Route("/echo", echo, methods=["GET", "POST"]), Route("/slow", slow)]
    with serve(Starlette(routes=routes)) as server:
        yield server


def refuse(status: int, content: bytes, model: str, headers: Mapping[str, str]) -> GatewayError:
    return GatewayError(f"backend answered {status}")


def upstream(url: str, transport: httpx.AsyncBaseTransport, headers: Mapping[str, str]) -> Upstream:
    return Upstream("openai", url, transport, headers, connect_timeout=2.0, error_from=refuse)


@pytest.mark.parametrize(
    "transport",
    [GatewayTransport, AiohttpTransport, httpx.AsyncHTTPTransport],
    ids=["http1", "aiohttp", "httpx"],
)
async def test_a_json_body_goes_with_its_content_type_and_a_get_without_one(
    backend: ServerThread, transport: type[httpx.AsyncBaseTransport]
) -> None:
    """Servers that check the type (FastAPI's, so vLLM's) refuse a JSON body sent without it."""
    async with transport() as client:
        calls = upstream(backend.url, client, {})
        assert await calls.request("POST", "/echo", {"a": 1}) == {
            "content_type": "application/json",
            "body": '{"a":1}',
        }
        assert await calls.request("GET", "/echo") == {"content_type": None, "body": ""}


async def test_a_content_type_from_the_backends_config_stands(backend: ServerThread) -> None:
    async with GatewayTransport() as client:
        calls = upstream(backend.url, client, {"Content-Type": "application/json; charset=utf-8"})
        seen = await calls.request("POST", "/echo", {"a": 1})
    assert seen["content_type"] == "application/json; charset=utf-8"


@pytest.mark.parametrize("transport", [GatewayTransport, AiohttpTransport], ids=["http1", "aiohttp"])
async def test_running_out_of_file_descriptors_is_the_gateways_503_not_the_backends(
    backend: ServerThread, transport: type[httpx.AsyncBaseTransport]
) -> None:
    async with transport() as client:
        calls = upstream(backend.url, client, {})
        with no_free_descriptors(), pytest.raises(GatewayError) as caught:
            await calls.request("GET", "/echo")
        assert await calls.request("GET", "/echo") == {"content_type": None, "body": ""}  # and after it
    error = caught.value
    assert type(error) is Unavailable  # not an UpstreamError: the backend did nothing wrong
    assert error.http_status == 503
    assert "The gateway is out of file descriptors" in error.message
    assert "(EMFILE: Too many open files)" in error.message  # the OS error, for the log line


@pytest.mark.parametrize("transport", [GatewayTransport, AiohttpTransport], ids=["http1", "aiohttp"])
async def test_with_a_wait_set_a_request_waits_that_long_for_a_free_connection(
    backend: ServerThread, transport: type[GatewayTransport | AiohttpTransport]
) -> None:
    """Not just its connect deadline (0.2 s here), which the first answer (0.6 s) outlasts."""
    async with transport(max_connections=1, wait=5.0) as client:
        calls = Upstream("openai", backend.url, client, {}, connect_timeout=0.2, error_from=refuse)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                for _ in range(2):
                    group.start_soon(calls.request, "GET", "/slow")


@pytest.mark.parametrize("transport", [GatewayTransport, AiohttpTransport], ids=["http1", "aiohttp"])
async def test_an_answer_that_is_not_http_is_a_malformed_answer_not_a_closed_connection(
    transport: type[httpx.AsyncBaseTransport],
) -> None:
    done = asyncio.Event()

    async def http2_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(bytes.fromhex("000000040000000000"))  # an HTTP/2 server's SETTINGS frame
            await writer.drain()
            await reader.read()  # until the client closes
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(http2_only, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = transport()
    async with server:
        with pytest.raises(
            UpstreamProtocol, match=f"^OpenAI-compatible server at {url} sent a malformed answer: "
        ):
            await upstream(url, pool, {}).request("GET", "/models")
        await asyncio.wait_for(done.wait(), 2)  # the client closed the connection it cannot read
        await pool.aclose()
