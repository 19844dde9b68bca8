"""A pool of Ollama instances behind one model name, through the real gateway: real HTTP fakes on
separate ports, each advertising its own models and loaded models."""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from gateway.config import Config, parse_config
from tests.e2e.conftest import wait_for
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, serve

pytestmark = pytest.mark.e2e
FAST_HEALTH = {"interval": 0.1, "unhealthy_after": 1, "cooldown": 0.5}


class Pool:
    def __init__(self, fakes: list[FakeOllama], servers: list[ServerThread]) -> None:
        self.fakes = fakes
        self.servers = servers

    def config(self, models: list[str], **routing: Any) -> Config:
        backends: list[dict[str, Any]] = [
            {"name": f"ollama-{i}", "type": "ollama", "base_url": server.url}
            for i, server in enumerate(self.servers)
        ]
        for backend, weight in zip(backends, routing.pop("weights", []), strict=False):
            backend["weight"] = weight
        for backend, cap in zip(backends, routing.pop("caps", []), strict=False):
            backend["max_inflight"] = cap
        for backend in backends:
            backend["timeouts"] = routing.get("timeouts", {})
        routing.pop("timeouts", None)
        deployments = [{"backend": b["name"]} for b in backends]
        return parse_config(
            {
                "backends": backends,
                "models": [{"name": name, "deployments": deployments} for name in models],
                "routing": {"health": FAST_HEALTH, **routing},
            },
            "test",
        )


@pytest.fixture
def pool() -> Iterator[Pool]:
    fakes = [
        FakeOllama(models=["llama3.2", "qwen2.5:0.5b"], loaded=[]),
        FakeOllama(models=["llama3.2"], loaded=["llama3.2"]),
        FakeOllama(models=["llama3.2", "gemma3:1b"], loaded=["gemma3:1b"]),
    ]
    with ExitStack() as stack:
        servers = [stack.enter_context(serve(fake.app)) for fake in fakes]
        yield Pool(fakes, servers)


def chat(gateway: ServerThread, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)


def ready(pool: Pool) -> None:
    """Until the gateway knows what every instance holds: each has answered /api/ps twice, so the
    first answer has been taken in (the refreshes of one instance follow one another)."""
    wait_for(lambda: all(sum(path == "/api/ps" for path, _ in f.requests) >= 2 for f in pool.fakes))
    assert all(sum(path == "/api/ps" for path, _ in f.requests) >= 2 for f in pool.fakes)


def test_requests_go_where_the_model_is_and_warm(
    pool: Pool, start_gateway: Callable[..., ServerThread]
) -> None:
    gateway = start_gateway(
        pool.config(["llama3.2", "qwen2.5:0.5b", "gemma3:1b", "phi4"], strategy="round_robin")
    )
    ready(pool)
    served = Counter(chat(gateway, "llama3.2").headers["x-phoenix-backend"] for _ in range(6))
    assert served == {"ollama-1": 6}  # the only one with llama3.2 in memory
    assert {chat(gateway, "qwen2.5:0.5b").headers["x-phoenix-backend"] for _ in range(4)} == {"ollama-0"}
    assert {chat(gateway, "gemma3:1b").headers["x-phoenix-backend"] for _ in range(4)} == {"ollama-2"}
    missing = chat(gateway, "phi4")
    assert missing.status_code == 404
    assert "ollama pull phi4" in missing.json()["error"]["message"]


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        ({"strategy": "round_robin"}, {"ollama-0": 10, "ollama-1": 10, "ollama-2": 10}),
        ({"strategy": "weighted", "weights": [1, 2, 3]}, {"ollama-0": 5, "ollama-1": 10, "ollama-2": 15}),
    ],
    ids=["round_robin", "weighted"],
)
def test_strategies_spread_requests(
    pool: Pool, start_gateway: Callable[..., ServerThread], routing: dict[str, Any], expected: dict[str, int]
) -> None:
    for fake in pool.fakes:
        fake.loaded = []  # all cold: nothing to prefer but the strategy
    gateway = start_gateway(pool.config(["llama3.2"], **routing))
    ready(pool)
    served = Counter(chat(gateway, "llama3.2").headers["x-phoenix-backend"] for _ in range(30))
    assert served == expected


def test_least_inflight_spreads_concurrent_requests(
    pool: Pool, start_gateway: Callable[..., ServerThread]
) -> None:
    for fake in pool.fakes:
        fake.loaded = []
        fake.default = Reply(delay_first=0.5)
    gateway = start_gateway(pool.config(["llama3.2"]))
    ready(pool)
    with concurrent.futures.ThreadPoolExecutor(9) as workers:
        answers = list(workers.map(lambda _: chat(gateway, "llama3.2"), range(9)))
    assert Counter(a.headers["x-phoenix-backend"] for a in answers) == {
        "ollama-0": 3,
        "ollama-1": 3,
        "ollama-2": 3,
    }


def test_a_conversation_stays_on_its_instance(pool: Pool, start_gateway: Callable[..., ServerThread]) -> None:
    for fake in pool.fakes:
        fake.loaded = ["llama3.2:latest"]
    gateway = start_gateway(pool.config(["llama3.2"], strategy="round_robin", affinity="prefix"))
    ready(pool)
    homes: dict[int, set[str]] = {}
    for turn in range(4):
        for conversation in range(6):
            messages = [
                {"role": "system", "content": "You are a tutor."},
                {"role": "user", "content": f"Question {conversation}"},
                *([{"role": "assistant", "content": "..."}, {"role": "user", "content": "and?"}] * turn),
            ]
            answer = httpx.post(
                gateway.url + "/v1/chat/completions", json={"model": "llama3.2", "messages": messages}
            )
            homes.setdefault(conversation, set()).add(answer.headers["x-phoenix-backend"])
    assert all(len(backends) == 1 for backends in homes.values()), homes
    assert len(set().union(*homes.values())) > 1  # different conversations, different homes


def test_a_dead_instance_costs_no_request_and_rejoins(
    pool: Pool, start_gateway: Callable[..., ServerThread]
) -> None:
    for fake in pool.fakes:
        fake.loaded = []
        fake.default = Reply(delay_first=0.02)
    gateway = start_gateway(pool.config(["llama3.2"], strategy="round_robin"))
    ready(pool)
    victim = pool.servers[1]

    def one(i: int) -> int:
        if i == 40:
            victim.stop()
        return chat(gateway, "llama3.2", stream=i % 2 == 0).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as workers:
        statuses = list(workers.map(one, range(120)))
    assert statuses == [200] * 120
    wait_for(lambda: not httpx.get(gateway.url + "/readyz").json()["backends"]["ollama-1"]["up"], timeout=2)
    assert httpx.get(gateway.url + "/readyz").json()["backends"]["ollama-1"]["up"] is False
    assert 'gateway_backend_up{backend="ollama-1"} 0.0' in httpx.get(gateway.url + "/metrics").text

    revived = ServerThread(pool.fakes[1].app, port=victim.port).start()
    try:
        served_before = len(pool.fakes[1].chat_bodies())
        wait_for(lambda: httpx.get(gateway.url + "/readyz").json()["backends"]["ollama-1"]["up"], timeout=3)
        for _ in range(6):
            assert chat(gateway, "llama3.2").status_code == 200
        assert len(pool.fakes[1].chat_bodies()) > served_before  # back in the rotation
    finally:
        revived.stop()


def test_past_max_inflight_a_request_waits_then_gets_429(
    pool: Pool, start_gateway: Callable[..., ServerThread]
) -> None:
    pool.fakes[0].default = Reply(delay_first=1.0)
    single = Pool(pool.fakes[:1], pool.servers[:1])
    gateway = start_gateway(single.config(["llama3.2"], caps=[1], max_wait=0.2))
    with concurrent.futures.ThreadPoolExecutor(2) as workers:
        answers = list(workers.map(lambda _: chat(gateway, "llama3.2"), range(2)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 429]
    limited = next(a for a in answers if a.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_error"


def test_when_every_instance_is_at_its_cap_a_request_takes_the_first_that_frees_up(
    pool: Pool, start_gateway: Callable[..., ServerThread]
) -> None:
    pair = two_warm_instances(pool)
    pair.fakes[0].default = Reply(content="slow", delay_first=5.0)
    pair.fakes[1].default = Reply(content="quick", delay_first=0.5)
    # round robin ranks the third request onto ollama-0, which stays busy past max_wait
    gateway = start_gateway(pair.config(["llama3.2"], strategy="round_robin", caps=[1, 1], max_wait=4))
    with concurrent.futures.ThreadPoolExecutor(2) as workers:
        busy = [workers.submit(chat, gateway, "llama3.2") for _ in range(2)]
        wait_for(lambda: all(f.chat_bodies() for f in pair.fakes))
        assert all(f.chat_bodies() for f in pair.fakes), "both instances should be busy"
        third = chat(gateway, "llama3.2")
        first, second = (future.result(timeout=10) for future in busy)
    assert third.status_code == 200, third.text
    assert third.headers["x-phoenix-backend"] == "ollama-1"
    assert sorted(a.headers["x-phoenix-backend"] for a in (first, second)) == ["ollama-0", "ollama-1"]


def test_an_instance_that_lost_the_model_since_its_inventory_passes_the_request_on(
    pool: Pool, start_gateway: Callable[..., ServerThread]
) -> None:
    pair = two_warm_instances(pool)
    health = {"interval": 60, "unhealthy_after": 3, "cooldown": 60}
    gateway = start_gateway(pair.config(["llama3.2"], strategy="round_robin", health=health))
    probed_once(pair)
    pair.fakes[0].models = []  # `ollama rm llama3.2` there; the gateway's inventory still lists it

    answers = [chat(gateway, "llama3.2", stream=stream) for stream in (False, True, False, True)]

    assert [(a.status_code, a.headers["x-phoenix-backend"]) for a in answers] == [(200, "ollama-1")] * 4
    assert pair.fakes[0].chat_bodies(), "no request was ranked onto the instance without the model"
    pair.fakes[1].models = []  # now no instance has it: Ollama's own 404 reaches the client
    missing = chat(gateway, "llama3.2")
    assert missing.status_code == 404
    assert "run `ollama pull llama3.2` there" in missing.json()["error"]["message"]


def test_two_openai_compatible_servers_are_balanced_the_same_way(
    start_gateway: Callable[..., ServerThread],
) -> None:
    fakes = [FakeOpenAI(models=["qwen2.5-7b"]) for _ in range(2)]
    with ExitStack() as stack:
        servers = [stack.enter_context(serve(fake.app)) for fake in fakes]
        config = parse_config(
            {
                "backends": [
                    {"name": f"vllm-{i}", "type": "openai", "base_url": s.url + "/v1", "local": True}
                    for i, s in enumerate(servers)
                ],
                "models": [{"name": "qwen", "deployments": [{"backend": "vllm-0", "model": "qwen2.5-7b"},
                                                            {"backend": "vllm-1", "model": "qwen2.5-7b"}]}],
                "routing": {"strategy": "round_robin", "health": FAST_HEALTH},
            },
            "test",
        )  # fmt: skip
        gateway = start_gateway(config)
        assert [chat(gateway, "qwen").status_code for _ in range(10)] == [200] * 10
        assert [len(fake.chat_bodies()) for fake in fakes] == [5, 5]

        fakes[0].models = []  # its server now serves another model: it answers 404 for this one
        answers = [chat(gateway, "qwen", stream=i % 2 == 0) for i in range(4)]
        assert [(a.status_code, a.headers["x-phoenix-backend"]) for a in answers] == [(200, "vllm-1")] * 4
        assert len(fakes[0].chat_bodies()) == 7  # two of them were asked there first, and moved on
        assert httpx.get(gateway.url + "/readyz").json()["backends"]["vllm-0"]["up"]  # a 404 is no failure

        servers[0].stop()
        assert [chat(gateway, "qwen", stream=i % 2 == 0).status_code for i in range(6)] == [200] * 6
        assert len(fakes[1].chat_bodies()) == 15  # the failed attempt was retried there
        wait_for(lambda: not httpx.get(gateway.url + "/readyz").json()["backends"]["vllm-0"]["up"], timeout=2)


def stream_outcome(gateway: ServerThread, model: str) -> tuple[str, str]:
    """A streamed chat read to its end: (backend, "done" or "error")."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=10) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    return response.headers["x-phoenix-backend"], "done" if events[-1] == "data: [DONE]" else "error"


def two_warm_instances(pool: Pool) -> Pool:
    for fake in pool.fakes:
        fake.loaded = ["llama3.2:latest"]
    return Pool(pool.fakes[1:], pool.servers[1:])


def probed_once(pool: Pool) -> None:
    """Until each instance's first probe has been taken in: it would reset their failure counts."""
    wait_for(lambda: all(any(path == "/api/ps" for path, _ in f.requests) for f in pool.fakes))
    assert all(any(path == "/api/ps" for path, _ in f.requests) for f in pool.fakes)


def test_an_instance_that_breaks_every_stream_mid_way_is_ejected(
    pool: Pool, start_gateway: Callable[..., ServerThread]
) -> None:
    pair = two_warm_instances(pool)
    pair.fakes[0].default = Reply(content="one two three four", error_after=2)  # Ollama's error line
    health = {"interval": 60, "unhealthy_after": 3, "cooldown": 60}
    gateway = start_gateway(pair.config(["llama3.2"], strategy="round_robin", health=health))
    probed_once(pair)

    outcomes = [stream_outcome(gateway, "llama3.2") for _ in range(10)]

    assert Counter(outcomes) == {("ollama-0", "error"): 3, ("ollama-1", "done"): 7}
    ready = httpx.get(gateway.url + "/readyz").json()
    assert ready["backends"]["ollama-0"]["up"] is False
    assert 'gateway_backend_up{backend="ollama-0"} 0.0' in httpx.get(gateway.url + "/metrics").text


@pytest.mark.parametrize(
    ("words", "gap", "ejected"),
    [(40, 0.05, False), (3, 1.5, True)],  # 2 s of steady words past `total`; a stall past `idle`
    ids=["total", "idle"],
)
def test_a_stream_cut_at_its_total_deadline_does_not_count_against_the_instance(
    pool: Pool, start_gateway: Callable[..., ServerThread], words: int, gap: float, ejected: bool
) -> None:
    """A long answer is no fault of the instance's; a backend that stops sending is."""
    pair = two_warm_instances(pool)
    pair.fakes[0].default = Reply(content=" ".join(f"w{i}" for i in range(words)), delay_between=gap)
    health = {"interval": 60, "unhealthy_after": 1, "cooldown": 60}
    timeouts = {"idle": 0.5, "total": 1.0}
    gateway = start_gateway(
        pair.config(["llama3.2"], strategy="round_robin", health=health, timeouts=timeouts)
    )
    probed_once(pair)

    outcomes = [stream_outcome(gateway, "llama3.2") for _ in range(2)]

    assert sorted(outcomes) == [("ollama-0", "error"), ("ollama-1", "done")]
    ready = httpx.get(gateway.url + "/readyz").json()
    assert ready["backends"]["ollama-0"]["up"] is not ejected


def test_a_client_leaving_mid_stream_does_not_count_against_the_instance(
    pool: Pool, start_gateway: Callable[..., ServerThread]
) -> None:
    pair = two_warm_instances(pool)
    for fake in pair.fakes:
        fake.default = Reply(content=" ".join(f"w{i}" for i in range(50)), delay_between=0.05)
    health = {"interval": 60, "unhealthy_after": 1, "cooldown": 60}
    gateway = start_gateway(pair.config(["llama3.2"], strategy="round_robin", health=health))
    probed_once(pair)
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}

    for _ in range(4):  # each instance twice; one failure would eject it
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=10) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
        # the client has gone: wait until the gateway has closed the stream upstream
    wait_for(lambda: sum(f.cancelled for f in pair.fakes) == 4)
    assert sum(f.cancelled for f in pair.fakes) == 4

    ready = httpx.get(gateway.url + "/readyz").json()
    assert {name: entry["up"] for name, entry in ready["backends"].items()} == {
        "ollama-0": True,
        "ollama-1": True,
    }
    for fake in pair.fakes:
        fake.default = Reply(content="short")
    assert {stream_outcome(gateway, "llama3.2") for _ in range(4)} == {
        ("ollama-0", "done"),
        ("ollama-1", "done"),
    }


@pytest.mark.parametrize(
    ("status", "text"),
    [(503, "server busy, please try again.  maximum pending requests exceeded"), (429, "rate limited")],
    ids=["ollama-queue-full", "429"],
)
def test_an_instance_that_says_it_is_busy_is_not_ejected(
    pool: Pool, start_gateway: Callable[..., ServerThread], status: int, text: str
) -> None:
    """A full queue is a working instance: ejecting it would take capacity away when it is most
    needed, alert that it is down, and with the whole pool busy turn /readyz to 503."""
    pair = two_warm_instances(pool)
    health = {"interval": 60, "unhealthy_after": 2, "cooldown": 60}
    gateway = start_gateway(pair.config(["llama3.2"], strategy="round_robin", health=health))
    probed_once(pair)
    for fake in pair.fakes:
        fake.queue(*[Reply(status=status, error_text=text)] * 4)

    assert [chat(gateway, "llama3.2").status_code for _ in range(4)] == [status] * 4

    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200
    assert {name: entry["up"] for name, entry in ready.json()["backends"].items()} == {
        "ollama-0": True,
        "ollama-1": True,
    }
    served = Counter(chat(gateway, "llama3.2").headers["x-phoenix-backend"] for _ in range(4))
    assert served == {"ollama-0": 2, "ollama-1": 2}
    for fake in pair.fakes:  # an instance that fails is still ejected
        fake.queue(*[Reply(status=500)] * 2)
    assert [chat(gateway, "llama3.2").status_code for _ in range(2)] == [502] * 2
    assert httpx.get(gateway.url + "/readyz").status_code == 503


def test_a_trial_request_whose_client_leaves_ends_the_trial_without_a_verdict(
    pool: Pool, start_gateway: Callable[..., ServerThread]
) -> None:
    """Half-open: one trial at a time. A trial that ended with no verdict (its client left) must not
    keep the instance out until a probe, which may be a long interval away."""
    pair = two_warm_instances(pool)
    health = {"interval": 60, "unhealthy_after": 1, "cooldown": 0.5}
    gateway = start_gateway(pair.config(["llama3.2"], strategy="round_robin", health=health))
    probed_once(pair)
    pair.fakes[0].default = Reply(status=500, error_text="kaput")
    wait_for(lambda: chat(gateway, "llama3.2").status_code == 200 and pair.fakes[0].chat_bodies())
    assert not httpx.get(gateway.url + "/readyz").json()["backends"]["ollama-0"]["up"]  # ejected
    time.sleep(0.6)  # the cool-down is over: the next request there is its trial
    pair.fakes[0].default = Reply(content="late", delay_first=5.0)
    asked = len(pair.fakes[0].chat_bodies())
    for _ in range(4):  # round robin: one of these is the trial, whose client gives up
        try:
            httpx.post(
                gateway.url + "/v1/chat/completions",
                json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
                timeout=0.5,
            )
        except httpx.TimeoutException:
            break
    assert len(pair.fakes[0].chat_bodies()) == asked + 1, "no trial request reached ollama-0"
    time.sleep(2.5)  # the gateway sees the client gone (checked once a second) and cancels the trial
    pair.fakes[0].default = Reply(content="back")
    answers = [chat(gateway, "llama3.2") for _ in range(4)]
    assert "ollama-0" in [a.headers["x-phoenix-backend"] for a in answers]


def test_an_instance_that_answered_it_lacks_the_model_is_passed_over_until_its_inventory_is_read(
    pool: Pool, start_gateway: Callable[..., ServerThread]
) -> None:
    """With no retries, each request ranked onto it would get its 404 until the next inventory."""
    pair = two_warm_instances(pool)
    health = {"interval": 60, "unhealthy_after": 3, "cooldown": 60}
    gateway = start_gateway(pair.config(["llama3.2"], strategy="round_robin", health=health, retries=0))
    probed_once(pair)
    pair.fakes[0].models = []  # `ollama rm llama3.2` there; the gateway's inventory still lists it

    answers = [chat(gateway, "llama3.2") for _ in range(6)]

    assert sorted(a.status_code for a in answers) == [200] * 5 + [404]
    assert len(pair.fakes[0].chat_bodies()) == 1
