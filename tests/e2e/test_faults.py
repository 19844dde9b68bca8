"""Fault injection: the gateway in front of a misbehaving upstream that is a real HTTP server.

Each fault is one scripted answer of `tests/fakes/faulty_server.py` (refused, reset, hang, stall,
5xx, 429, garbage, truncation, an endless line). Each test checks what the client sees, what the
metrics say, and that nothing is left behind: the in-flight gauge back at 0, every upstream
connection finished or closed at the fake's end, and the gateway's event loop back to the tasks
it had before the request.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway import http1
from gateway.app import HotRoutes
from gateway.config import parse_config
from gateway.state import state_of
from tests.e2e.conftest import sample, scrape, wait_for
from tests.fakes.faulty_server import (
    FaultyOllama,
    Script,
    chunk,
    close,
    end,
    faulty_servers,
    hang,
    head,
    line,
    ok,
    raw,
    reply,
    reset,
    sleep,
    wait,
)
from tests.servers import ServerThread, free_port, no_free_descriptors, unaccepting_address

pytestmark = pytest.mark.e2e

TIMEOUTS = {"connect": 1.0, "first_token": 1.0, "idle": 0.5, "total": 10.0}
HELLO = [{"role": "user", "content": "hello"}]
ERROR_KEYS = {"message", "type", "param", "code"}
MiB = 1024 * 1024


@dataclass
class Rig:
    gateway: ServerThread
    fakes: list[FaultyOllama]
    names: list[str]  # backend name of each fake, in order
    baseline: int  # the gateway loop's task count at rest

    def post(self, stream: bool) -> httpx.Response:
        body = {"model": "llama", "messages": HELLO, "stream": stream}
        return httpx.post(self.gateway.url + "/v1/chat/completions", json=body, timeout=10)

    def name_of(self, fake: FaultyOllama) -> str:
        return self.names[self.fakes.index(fake)]


def gateway_tasks(gateway: ServerThread) -> list[asyncio.Task[Any]]:
    """The tasks of the gateway's event loop (read on that loop), this probe excluded."""

    async def snapshot() -> list[asyncio.Task[Any]]:
        return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

    assert gateway.loop is not None
    return asyncio.run_coroutine_threadsafe(snapshot(), gateway.loop).result(timeout=2)


def settled_task_count(gateway: ServerThread, limit: float = 3.0) -> int:
    """The task count once it has stayed the same for 0.15 s (the start-up probes are over)."""
    deadline = time.monotonic() + limit
    last, same_since = len(gateway_tasks(gateway)), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        count = len(gateway_tasks(gateway))
        if count != last:
            last, same_since = count, time.monotonic()
        elif time.monotonic() - same_since >= 0.15:
            break
    return last


@pytest.fixture
def rig(start_gateway: Callable[..., ServerThread]) -> Iterator[Callable[[int, int], Rig]]:
    """`rig(servers, refused, unanswered)`: a gateway whose model `llama` has `servers` faulty
    instances, then `refused` addresses where nothing listens, then `unanswered` ones where
    connecting gets no answer, all with short timeouts (`timeouts` overrides some)."""
    opened: list[Any] = []

    def make(servers: int, refused: int = 0, unanswered: int = 0, **timeouts: float) -> Rig:
        context = faulty_servers(servers)
        fakes = context.__enter__()
        opened.append(context)
        urls = [fake.url for fake in fakes] + [f"http://127.0.0.1:{free_port()}" for _ in range(refused)]
        for _ in range(unanswered):
            silent = unaccepting_address()
            urls.append(silent.__enter__())
            opened.append(silent)
        names = [f"ollama-{i}" for i in range(1, len(urls) + 1)]
        backends = [
            {"name": name, "type": "ollama", "base_url": url, "timeouts": {**TIMEOUTS, **timeouts}}
            for name, url in zip(names, urls, strict=True)
        ]
        deployments = [{"backend": name, "model": "llama3.2:latest"} for name in names]
        config = parse_config(
            {
                "backends": backends,
                "models": [{"name": "llama", "deployments": deployments}],
                "routing": {"retries": 2, "health": {"interval": 60}},
            },
            "test",
        )
        gateway = start_gateway(config)
        wait_for(lambda: all(("GET", "/api/ps") in fake.requests for fake in fakes), 3)
        return Rig(gateway, fakes, names, settled_task_count(gateway))

    yield make
    while opened:
        opened.pop().__exit__(None, None, None)


def assert_nothing_left(rig: Rig) -> None:
    """In-flight 0 everywhere, no upstream connection mid-request, the loop back to its tasks."""
    wait_for(lambda: all(fake.busy() == 0 for fake in rig.fakes), 3)
    assert [fake.busy() for fake in rig.fakes] == [0] * len(rig.fakes)
    wait_for(lambda: len(gateway_tasks(rig.gateway)) <= rig.baseline, 3)
    left = gateway_tasks(rig.gateway)
    assert len(left) <= rig.baseline, [repr(task.get_coro()) for task in left]
    samples = scrape(rig.gateway.url)
    inflight = {dict(labels)["backend"]: value for (name, labels), value in samples.items()
                if name == "gateway_inflight_requests"}  # fmt: skip
    assert set(inflight) == set(rig.names)
    assert all(value == 0 for value in inflight.values()), inflight


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    return dict(body["error"])


def requests_total(rig: Rig, backend: str, status: int) -> float:
    labels = {"endpoint": "chat", "model": "llama", "backend": backend, "status": str(status)}
    return sample(scrape(rig.gateway.url), "gateway_requests_total", **labels)


def upstream_errors(rig: Rig, backend: str, reason: str) -> float:
    return sample(scrape(rig.gateway.url), "gateway_upstream_errors_total", backend=backend, reason=reason)


def retries(rig: Rig, backend: str) -> float:
    return sample(scrape(rig.gateway.url), "gateway_retries_total", backend=backend)


# ---- before the first byte, one instance: an OpenAI-shaped error ----


@pytest.mark.parametrize("stream", [False, True])
def test_connection_refused_is_503(rig: Callable[..., Rig], stream: bool) -> None:
    setup = rig(0, 1)
    started = time.monotonic()
    response = setup.post(stream)
    assert time.monotonic() - started < 3
    assert response.status_code == 503
    error = error_of(response)
    assert error["type"] == "server_error"
    assert "Cannot connect to Ollama server at http://127.0.0.1:" in error["message"]
    assert upstream_errors(setup, "ollama-1", "connect") == 1
    assert requests_total(setup, "ollama-1", 503) == 1
    assert_nothing_left(setup)


@pytest.mark.parametrize("stream", [False, True])
def test_a_connect_timeout_is_504(rig: Callable[..., Rig], stream: bool) -> None:
    setup = rig(0, 0, 1, connect=0.5)
    response = setup.post(stream)
    assert response.status_code == 504  # README: when a backend's timeout runs out the answer is 504
    error = error_of(response)
    assert error["type"] == "server_error"
    assert "Timed out connecting to Ollama server at http://127.0.0.1:" in error["message"]
    assert upstream_errors(setup, "ollama-1", "timeout") == 1
    assert upstream_errors(setup, "ollama-1", "connect") == 0
    assert requests_total(setup, "ollama-1", 504) == 1
    assert_nothing_left(setup)


def test_running_out_of_file_descriptors_is_the_gateways_503_and_no_fault_of_the_backend(
    rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http1, "IDLE_PER_HOST", 0)  # each request needs a new upstream connection
    setup = rig(1)
    with httpx.Client(timeout=10) as client:  # one client connection, open before the limit
        body = {"model": "llama", "messages": HELLO, "stream": False}
        url = setup.gateway.url + "/v1/chat/completions"
        assert client.post(url, json=body).status_code == 200
        wait_for(lambda: all(conn.closed_at for conn in setup.fakes[0].connections), 3)
        front = setup.gateway.server.config.app
        assert isinstance(front, HotRoutes)
        state = state_of(front.app)
        assert setup.gateway.loop is not None
        with no_free_descriptors():
            answers = [client.post(url, json=body) for _ in range(3)]  # unhealthy_after: 3
            for _ in range(3):  # and as many rounds of health probes
                asyncio.run_coroutine_threadsafe(state.refresh(), setup.gateway.loop).result(timeout=5)
        assert [answer.status_code for answer in answers] == [503] * 3
        error = error_of(answers[0])
        assert error["message"].startswith("The gateway is out of file descriptors")
        assert "(EMFILE: Too many open files)" in error["message"]
        assert upstream_errors(setup, "ollama-1", "connect") == 0  # not counted against the backend
        assert sample(scrape(setup.gateway.url), "gateway_backend_up", backend="ollama-1") == 1  # nor ejected
        assert client.post(url, json=body).status_code == 200  # and it recovers
    assert requests_total(setup, "ollama-1", 503) == 3
    assert_nothing_left(setup)


H2_SETTINGS = bytes.fromhex("000000040000000000")  # what an HTTP/2-only server sends first


BEFORE_FIRST_BYTE: dict[str, tuple[Script, int, str, str]] = {
    # fault: (script, client status, error type, upstream error reason)
    "reset-before-head": ([reset()], 503, "server_error", "connect"),
    "reset-after-head": ([head(), reset()], 502, "server_error", "protocol"),
    "close-before-head": ([close()], 503, "server_error", "connect"),
    "hang-before-head": ([hang()], 504, "server_error", "timeout"),
    "hang-after-head": ([head(), hang()], 504, "server_error", "timeout"),
    "500": ([reply(500, {"error": "model runner crashed"})], 502, "server_error", "status"),
    "503": ([reply(503, {"error": "server busy, please try again"})], 503, "server_error", "status"),
    "malformed-first-line": ([head(), chunk(b"<html>oops</html>\n"), end()], 502, "server_error", "protocol"),
    "no-lines-at-all": ([head(), end()], 502, "server_error", "protocol"),
    "not-http": ([raw(H2_SETTINGS), close()], 502, "server_error", "protocol"),
}


@pytest.mark.parametrize(
    ("fault", "stream"),
    [(fault, stream) for fault in BEFORE_FIRST_BYTE for stream in (False, True)],
)
def test_fault_before_the_first_byte_on_one_instance_is_an_openai_error(
    rig: Callable[..., Rig], fault: str, stream: bool
) -> None:
    script, status, error_type, reason = BEFORE_FIRST_BYTE[fault]
    setup = rig(1)
    setup.fakes[0].queue(script)
    started = time.monotonic()
    response = setup.post(stream)
    assert time.monotonic() - started < TIMEOUTS["first_token"] + 2
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert error_of(response)["type"] == error_type
    assert setup.fakes[0].chats == 1
    assert upstream_errors(setup, "ollama-1", reason) == 1
    assert requests_total(setup, "ollama-1", status) == 1
    assert_nothing_left(setup)


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ([raw(H2_SETTINGS), close()], "Expected HTTP/"),
        ([raw(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (1 * MiB)), hang()], "headers longer than 64 KiB"),
    ],
    ids=["not-http", "endless-header"],
)
def test_an_answer_that_cannot_be_read_is_a_502_saying_so_not_a_closed_connection(
    rig: Callable[..., Rig], script: Script, why: str
) -> None:
    setup = rig(1)
    setup.fakes[0].queue(script)
    response = setup.post(stream=False)
    assert response.status_code == 502, response.text
    message = error_of(response)["message"]
    assert message.startswith(f"Ollama server at {setup.fakes[0].url} sent a malformed answer: "), message
    assert why in message
    assert upstream_errors(setup, "ollama-1", "protocol") == 1
    assert_nothing_left(setup)


# ---- before the first byte, two instances: the other one answers ----

RETRIED: dict[str, tuple[Script, str]] = {
    "reset-before-head": ([reset()], "connect"),
    "hang-before-head": ([hang()], "timeout"),
    "hang-after-head": ([head(), hang()], "timeout"),
    "500": ([reply(500, {"error": "model runner crashed"})], "status"),
    "429": ([reply(429, {"error": "too many requests"}, ("Retry-After", "7"))], "status"),
    "malformed-first-line": ([head(), chunk(b"\x00\xff garbage\n"), end()], "protocol"),
}


@pytest.mark.parametrize(
    ("fault", "stream"),
    [(fault, stream) for fault in RETRIED for stream in (False, True)],
)
def test_fault_before_the_first_byte_moves_to_the_other_instance(
    rig: Callable[..., Rig], fault: str, stream: bool
) -> None:
    script, reason = RETRIED[fault]
    setup = rig(2)
    setup.fakes[0].queue(script)  # the queue is shared: the first chat, wherever it lands, fails
    response = setup.post(stream)
    assert response.status_code == 200, response.text
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]")
    served = response.headers["x-phoenix-backend"]
    failed = next(name for name in setup.names if name != served)
    assert [fake.chats for fake in setup.fakes] == [1, 1]
    assert retries(setup, failed) == 1
    assert retries(setup, served) == 0
    assert upstream_errors(setup, failed, reason) == 1
    assert requests_total(setup, served, 200) == 1
    assert_nothing_left(setup)


def left_in_cycles(run: Callable[[], object]) -> set[str]:
    """The gateway's objects that `run` leaves in reference cycles, which `serve` frees only at the
    collector's full pass, and that rarely (gateway/cli.py): what a request leaves there, its
    sockets and body included, stays for long."""
    gc.collect()
    gc.disable()  # what the request leaves in a cycle stays there until the look below
    try:
        run()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return {type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("gateway.")}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


REQUEST = {"Exchange", "Incoming", "ChatRequest"}  # a request, its body


@pytest.mark.parametrize("ending", ["every-instance-fails", "client-leaves-the-retry"])
def test_a_request_that_ends_after_a_retry_leaves_no_reference_cycle(
    rig: Callable[..., Rig], ending: str
) -> None:
    """RSS climbed by 13 KB for each request a client left while it was retried."""
    setup = rig(2, first_token=5)
    setup.fakes[0].queue([reply(500, {"error": "model runner crashed"})])  # the first chat, wherever
    second = [reply(500, {"error": "again"})] if ending == "every-instance-fails" else [sleep(5), *ok()]
    setup.fakes[0].queue(second)

    def run() -> None:
        if ending == "every-instance-fails":
            assert setup.post(stream=False).status_code == 502
        else:
            body = {"model": "llama", "messages": HELLO, "stream": False}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(setup.gateway.url + "/v1/chat/completions", json=body, timeout=1.5)
            wait_for(lambda: sum(requests_total(setup, name, 499) for name in setup.names) == 1, 3)
        assert_nothing_left(setup)

    left = left_in_cycles(run)
    assert sum(retries(setup, name) for name in setup.names) == 1
    assert not left & REQUEST, left


@pytest.mark.parametrize(("fault", "status"), [("reset", 502), ("stall", 504)])
def test_a_stream_that_fails_midway_leaves_no_reference_cycle(
    rig: Callable[..., Rig], fault: str, status: int
) -> None:
    setup = rig(1)
    setup.fakes[0].queue([head(), chunk(line("a ")), reset() if fault == "reset" else hang()])

    def run() -> None:
        response = setup.post(stream=True)
        assert '"error"' in response.text
        wait_for(lambda: requests_total(setup, "ollama-1", status) == 1, 3)
        assert_nothing_left(setup)

    left = left_in_cycles(run)
    assert requests_total(setup, "ollama-1", status) == 1
    assert not left & REQUEST, left


# ---- after the first byte: an SSE error event, no [DONE], never retried ----

MID_STREAM: dict[str, tuple[Script, int]] = {
    # fault, played once the client holds the first content event: (script, status in the metrics)
    "reset": ([reset()], 502),
    "stall": ([hang()], 504),
    "500-error-line": (
        [chunk(b'{"error": "an error was encountered while running the model"}\n'), hang()],
        502,
    ),
    "malformed-line": ([chunk(b'{"model": "llama3.2:latest", "message": \n'), hang()], 502),
    "truncated-no-done": ([end()], 502),
    "truncated-mid-line": ([chunk(b'{"model": "llama3.2:lat'), close()], 502),
    "absurdly-long-line": ([*[chunk(b"x" * MiB)] * 17, hang()], 502),
}


def read_events(response: httpx.Response, first_seen: threading.Event) -> list[str]:
    """Every `data:` payload; `first_seen` is set when the first content delta has arrived."""
    events = []
    for text in response.iter_lines():
        if text.startswith("data: "):
            events.append(text.removeprefix("data: "))
            if '"content":"a "' in text:
                first_seen.set()
    return events


@pytest.mark.parametrize("fault", list(MID_STREAM))
def test_fault_after_the_first_byte_is_an_sse_error_and_no_done(rig: Callable[..., Rig], fault: str) -> None:
    script, status = MID_STREAM[fault]
    first_seen = threading.Event()
    setup = rig(2)
    setup.fakes[0].queue([head(), chunk(line("a ")), wait(first_seen), *script])
    body = {"model": "llama", "messages": HELLO, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", setup.gateway.url + "/v1/chat/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        events = read_events(response, first_seen)
    assert time.monotonic() - started < 5
    assert first_seen.is_set()
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert set(error) == ERROR_KEYS
    assert error["type"] == "server_error"
    if fault.startswith("truncated-no-done"):
        assert error["code"] == "upstream_incomplete"
    assert all("error" not in json.loads(event) for event in events[:-1])
    backend = response.headers["x-phoenix-backend"]
    assert sum(fake.chats for fake in setup.fakes) == 1  # never retried once bytes went out
    assert sum(retries(setup, name) for name in setup.names) == 0
    assert requests_total(setup, backend, status) == 1, [
        (k, v) for k, v in scrape(setup.gateway.url).items() if k[0] == "gateway_requests_total"
    ]
    assert_nothing_left(setup)


def test_a_stream_ends_at_the_done_line_and_closes_a_body_the_backend_holds_open(
    rig: Callable[..., Rig],
) -> None:
    setup = rig(1)
    setup.fakes[0].queue([head(), chunk(line("a ")), chunk(line(done=True)), hang()])
    body = {"model": "llama", "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", setup.gateway.url + "/v1/chat/completions", json=body, timeout=10) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"  # at once, not an error event at the idle deadline
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 2
    assert all("error" not in json.loads(event) for event in events[:-1])
    wait_for(lambda: requests_total(setup, "ollama-1", 200) == 1, 3)
    assert requests_total(setup, "ollama-1", 200) == 1
    assert upstream_errors(setup, "ollama-1", "timeout") == 0
    # its body was not read to the end: the connection is closed, not reused
    wait_for(setup.fakes[0].peer_closes, 3)
    assert len(setup.fakes[0].peer_closes()) == 1
    assert_nothing_left(setup)


def test_a_body_that_ends_just_after_its_done_line_keeps_its_connection(rig: Callable[..., Rig]) -> None:
    # as a real server does: the end marker, then the body's end in a write of its own
    setup = rig(1)
    paced_end = [head(), chunk(line("a ")), chunk(line(done=True)), sleep(0.005), end()]
    setup.fakes[0].queue(paced_end, paced_end)
    body = {"model": "llama", "messages": HELLO, "stream": True}
    for _ in range(2):
        answer = httpx.post(setup.gateway.url + "/v1/chat/completions", json=body, timeout=10)
        assert answer.status_code == 200 and answer.text.rstrip().endswith("data: [DONE]"), answer.text
    # no connection was cut: each answer's body was read to its end, and its connection kept
    assert [(conn.closed_at, conn.peer_closed_at) for conn in setup.fakes[0].connections] == [
        (None, None)
    ] * len(setup.fakes[0].connections)
    assert_nothing_left(setup)


# ---- the client goes away ----


@pytest.mark.parametrize(
    ("fault", "reason"), [("reset", "protocol"), ("stall", "timeout"), ("500-error-line", "status")]
)
def test_a_fault_after_the_first_byte_counts_as_an_upstream_error(
    rig: Callable[..., Rig], fault: str, reason: str
) -> None:
    script, _ = MID_STREAM[fault]
    first_seen = threading.Event()
    setup = rig(1)
    setup.fakes[0].queue([head(), chunk(line("a ")), wait(first_seen), *script])
    body = {"model": "llama", "messages": HELLO, "stream": True}
    with httpx.stream("POST", setup.gateway.url + "/v1/chat/completions", json=body, timeout=10) as response:
        events = read_events(response, first_seen)
    assert "error" in json.loads(events[-1])
    assert upstream_errors(setup, "ollama-1", reason) == 1
    assert_nothing_left(setup)


def test_429_passes_its_retry_after_to_the_client(rig: Callable[..., Rig]) -> None:
    setup = rig(1)
    setup.fakes[0].queue([reply(429, {"error": "too many requests"}, ("Retry-After", "7"))])
    response = setup.post(stream=True)
    assert response.status_code == 429
    assert error_of(response)["type"] == "rate_limit_error"
    assert response.headers.get("retry-after") == "7"
    assert upstream_errors(setup, "ollama-1", "status") == 1
    assert requests_total(setup, "ollama-1", 429) == 1
    assert_nothing_left(setup)


def test_client_disconnect_closes_the_upstream_within_a_second(rig: Callable[..., Rig]) -> None:
    setup = rig(1)
    fake = setup.fakes[0]
    slow = [step for _ in range(200) for step in (chunk(line("tok ")), sleep(0.05))]
    fake.queue([head(), *slow, chunk(line(done=True)), end()])
    body = {"model": "llama", "messages": HELLO, "stream": True}
    with httpx.stream("POST", setup.gateway.url + "/v1/chat/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert next(lines) == ""
        assert next(lines).startswith("data: ")
        left_at = time.monotonic()
    wait_for(fake.peer_closes, 2)
    closes = fake.peer_closes()
    assert len(closes) == 1, "the upstream never saw the gateway close the connection"
    assert closes[0] - left_at < 1.0
    wait_for(lambda: requests_total(setup, "ollama-1", 499) >= 1, 2)
    assert requests_total(setup, "ollama-1", 499) == 1
    assert upstream_errors(setup, "ollama-1", "protocol") + upstream_errors(setup, "ollama-1", "timeout") == 0
    assert_nothing_left(setup)


def test_good_lines_in_the_same_read_as_a_malformed_one_reach_the_client_first(
    rig: Callable[..., Rig],
) -> None:
    first_seen = threading.Event()
    setup = rig(1)
    one_read = chunk(line("b ") + line("c ") + b"{not json\n")
    setup.fakes[0].queue([head(), chunk(line("a ")), wait(first_seen), one_read, hang()])
    body = {"model": "llama", "messages": HELLO, "stream": True}
    with httpx.stream("POST", setup.gateway.url + "/v1/chat/completions", json=body, timeout=10) as response:
        events = read_events(response, first_seen)
    contents = [json.loads(event)["choices"][0]["delta"].get("content") for event in events[:-1]]
    assert [text for text in contents if text] == ["a ", "b ", "c "]
    assert json.loads(events[-1])["error"]["type"] == "server_error"
    assert_nothing_left(setup)
