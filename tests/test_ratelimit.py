"""Token buckets per key: the arithmetic on a fake clock, and the same rules in a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from gateway import ratelimit
from gateway.config import Limits, RateLimits, parse_config
from gateway.errors import RateLimited, Unavailable
from gateway.logs import get_logger
from gateway.ratelimit import _ADMIT, MemoryStore, RateLimiter, RedisStore, duration, estimate
from gateway.state import State
from tests.servers import redis_server

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(limits: Limits, clock: Clock) -> RateLimiter:
    return RateLimiter(RateLimits(default=limits), MemoryStore(clock))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.0201, "21ms"), (1.0, "1s"), (1.5, "1.5s"), (59.9, "59.9s"), (60.0, "1m0s"),
     (360.0, "6m0s"), (90.25, "1m30.25s"), (3600.0, "1h0m0s"), (6006.962, "1h40m6.962s")],
)  # fmt: skip
def test_reset_durations_read_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_estimate_counts_utf8_bytes_over_four_plus_the_output_allowance() -> None:
    assert estimate(["abcd" * 10], None) == 10
    assert estimate(["é" * 4], 5) == 2 + 5  # 8 bytes
    assert estimate([], 7) == 7


async def test_requests_per_minute_burst_then_refill_at_the_steady_rate() -> None:
    clock = Clock()
    rate = limiter(Limits(rpm=3), clock)
    remaining = []
    for _ in range(3):
        reservation = await rate.admit("app", Limits(rpm=3), 0)
        remaining.append(reservation.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    with pytest.raises(RateLimited) as refused:
        await rate.admit("app", Limits(rpm=3), 0)
    assert refused.value.headers["retry-after"] == "20"  # one request refills in 60/3 s
    assert refused.value.headers["retry-after-ms"] == "20000"
    assert refused.value.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "the API key 'app' on requests per minute: limit 3" in refused.value.message
    clock.now += 19.9
    with pytest.raises(RateLimited):
        await rate.admit("app", Limits(rpm=3), 0)
    clock.now += 0.1
    assert (await rate.admit("app", Limits(rpm=3), 0)).headers["x-ratelimit-remaining-requests"] == "0"
    await rate.admit("other", Limits(rpm=3), 0)  # every key has its own buckets


async def test_tokens_are_settled_to_the_real_count_and_debt_delays_the_next_request() -> None:
    clock = Clock()
    rate = limiter(Limits(tpm=600), clock)  # 10 tokens a second
    first = await rate.admit("app", Limits(tpm=600), 100)
    assert first.headers["x-ratelimit-remaining-tokens"] == "500"
    rate.settle(first, 900)  # the answer was long: 800 more than estimated
    await asyncio.sleep(0)  # the settlement runs in the background
    with pytest.raises(RateLimited) as refused:
        await rate.admit("app", Limits(tpm=600), 50)
    # level 600 - 900 = -300; 50 tokens are there after 35 s
    assert refused.value.headers["retry-after"] == "35"
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"
    clock.now += 35
    second = await rate.admit("app", Limits(tpm=600), 50)
    rate.settle(second, 10)  # shorter than estimated: 40 come back
    await asyncio.sleep(0)
    assert (await rate.admit("app", Limits(tpm=600), 40)).headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_request_larger_than_the_whole_budget_is_told_it_can_never_fit() -> None:
    rate = limiter(Limits(tpm=100), Clock())
    with pytest.raises(RateLimited) as refused:
        await rate.admit("app", Limits(tpm=100), 101)
    assert "it may use 101 tokens" in refused.value.message
    assert refused.value.headers == {"x-should-retry": "false"}


async def test_both_limits_are_debited_together_or_not_at_all() -> None:
    clock = Clock()
    rate = limiter(Limits(rpm=10, tpm=100), clock)
    await rate.admit("app", Limits(rpm=10, tpm=100), 90)
    with pytest.raises(RateLimited) as refused:
        await rate.admit("app", Limits(rpm=10, tpm=100), 20)
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "9"  # not taken
    assert "on tokens per minute" in refused.value.message


async def test_a_key_at_its_max_inflight_is_refused_until_one_of_its_requests_ends() -> None:
    limits = Limits(rpm=10, max_inflight=2)
    rate = limiter(limits, Clock())
    first, second = [await rate.admit("app", limits, 0) for _ in range(2)]
    with pytest.raises(RateLimited) as refused:
        await rate.admit("app", limits, 0)
    assert refused.value.message == (
        "Too many requests under way for the API key 'app': limit 2 at once."
        " Please try again when one of them has finished."
    )
    assert refused.value.code == "rate_limit_exceeded"
    assert refused.value.headers["retry-after"] == "1"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "8"  # the refusal took none
    await rate.admit("other", limits, 0)  # each key counts its own
    rate.settle(first, 0)  # at once, not in the background: the client may ask again right away
    third = await rate.admit("app", limits, 0)
    assert third.headers["x-ratelimit-remaining-requests"] == "7"
    for reservation in (second, third):
        rate.settle(reservation, 0)
    assert [await rate.admit("app", limits, 0) for _ in range(2)]


async def test_max_inflight_alone_is_a_limit_and_counts_only_what_it_admitted() -> None:
    clock = Clock()
    rate = limiter(Limits(max_inflight=1), clock)
    assert rate.limits(None) == Limits(max_inflight=1)
    held = await rate.admit("app", Limits(max_inflight=1), 0)
    assert held.lease and held.headers == {}
    unlimited = await rate.admit("app", Limits(rpm=100), 0)  # admitted under a reload's limits
    rate.settle(unlimited, 0)  # no lease: the one under way still counts
    with pytest.raises(RateLimited):
        await rate.admit("app", Limits(max_inflight=1), 0)
    rate.settle(held, 0)
    await rate.admit("app", Limits(max_inflight=1), 0)


def test_keys_limits_override_the_default_and_no_limits_means_no_limiter_work() -> None:
    rate = RateLimiter(RateLimits(default=Limits(rpm=5)), MemoryStore())
    assert rate.limits(None) == Limits(rpm=5)
    assert rate.limits(Limits(tpm=9)) == Limits(tpm=9)
    assert RateLimiter(RateLimits(), MemoryStore()).limits(None) is None


def test_a_reload_keeps_the_buckets_unless_the_store_changes() -> None:
    data = {
        "backends": [{"name": "o", "type": "ollama"}],
        "models": [{"name": "m", "deployments": [{"backend": "o"}]}],
        "rate_limits": {"default": {"rpm": 5}},
    }
    state = State.build(parse_config(data, "a"), environ={})
    same = state.successor(parse_config({**data, "rate_limits": {"default": {"rpm": 7}}}, "b"), environ={})
    assert same.limiter.store is state.limiter.store
    assert same.limiter.limits(None) == Limits(rpm=7)
    moved = state.successor(
        parse_config({**data, "rate_limits": {"redis_url": "redis://127.0.0.1:1/0"}}, "c"), environ={}
    )
    assert isinstance(moved.limiter.store, RedisStore)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


async def test_redis_buckets_are_one_budget_for_every_replica_even_when_they_race(redis_url: str) -> None:
    replicas = [
        RateLimiter(RateLimits(redis_url=redis_url), RedisStore(redis_url, "t:", log=None)) for _ in range(2)
    ]
    try:
        outcomes = await asyncio.gather(
            *(replicas[i % 2].admit("app", Limits(rpm=5), 0) for i in range(20)), return_exceptions=True
        )
        admitted = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, RateLimited)]
        assert (len(admitted), len(refused)) == (5, 15)
        assert sorted(r.headers["x-ratelimit-remaining-requests"] for r in admitted) == [
            "0",
            "1",
            "2",
            "3",
            "4",
        ]
        assert {r.headers["retry-after"] for r in refused} == {"12"}  # 60/5 s, less Redis's clock drift
        client = redis.Redis.from_url(redis_url)
        assert 0 < await client.pttl("t:app:requests") <= 61_000  # gone once it would be full again
        await client.aclose()
    finally:
        for replica in replicas:
            await replica.aclose()


async def test_redis_admits_a_whole_burst_however_close_together_it_arrives(redis_url: str) -> None:
    # Admissions microseconds apart, as many replicas can send them: the time stored with a level
    # must be exact, or a bucket of 5 reads 0.99999... for its fifth request and refuses it.
    client = redis.Redis.from_url(redis_url)
    admit = client.register_script(_ADMIT)
    try:
        for burst in range(200):  # one in about 70 went wrong when times were rounded
            pipe = client.pipeline(transaction=False)
            for _ in range(6):
                keys = [f"b{burst}:requests", f"b{burst}:tokens", f"b{burst}:inflight"]
                await admit(keys=keys, args=[5, 0, 0, 0, "", 0], client=pipe)
            outcomes = [admitted for admitted, *_ in await pipe.execute()]
            assert outcomes == [1, 1, 1, 1, 1, 0], f"burst {burst}"
    finally:
        await client.aclose()


async def test_a_bucket_stored_by_an_older_gateway_reads_as_full(redis_url: str) -> None:
    # Before times were kept in microseconds ('at_us'), they were seconds ('at'); read as
    # microseconds those would refill nothing, so such a key counts as absent until it expires.
    client = redis.Redis.from_url(redis_url)
    await client.hset("t:app:requests", mapping={"level": "0", "at": "1796016674.8436"})
    limiter = RateLimiter(RateLimits(), RedisStore(redis_url, "t:", log=None))
    try:
        reservation = await limiter.admit("app", Limits(rpm=5), 0)
        assert reservation.headers["x-ratelimit-remaining-requests"] == "4"
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_redis_settlement_carries_debt_across_replicas(redis_url: str) -> None:
    a = RateLimiter(RateLimits(), RedisStore(redis_url, "t:", log=None))
    b = RateLimiter(RateLimits(), RedisStore(redis_url, "t:", log=None))
    try:
        reservation = await a.admit("app", Limits(tpm=600), 100)
        assert reservation.headers["x-ratelimit-remaining-tokens"] == "500"
        a.settle(reservation, 1000)
        await a.aclose()  # waits for the settlement
        with pytest.raises(RateLimited) as refused:
            await b.admit("app", Limits(tpm=600), 10)
        assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"
        assert 40 <= int(refused.value.headers["retry-after"]) <= 41  # -400 + 10 at 10 per second
    finally:
        await b.aclose()


async def test_redis_counts_a_keys_requests_under_way_across_replicas(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = Limits(tpm=600, max_inflight=2)
    a, b = (RateLimiter(RateLimits(), RedisStore(redis_url, "t:", log=None)) for _ in range(2))
    client = redis.Redis.from_url(redis_url)
    try:
        outcomes = await asyncio.gather(
            *((a if i % 2 else b).admit("app", limits, 10) for i in range(6)), return_exceptions=True
        )
        held = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, RateLimited)]
        assert (len(held), len(refused)) == (2, 4)
        assert all("limit 2 at once" in r.message for r in refused)
        assert await client.zcard("t:app:inflight") == 2
        assert refused[0].headers["x-ratelimit-remaining-tokens"] == "580"  # refusals took nothing
        owner = a if held[0].lease in a._leases else b
        owner.settle(held[0], 10)
        await asyncio.gather(*owner._settling)
        assert await client.zcard("t:app:inflight") == 1
        again = await (b if owner is a else a).admit("app", limits, 10)  # the other replica sees the room
        assert again.lease
    finally:
        await client.aclose()
        await a.aclose()
        await b.aclose()


async def test_redis_leases_are_renewed_while_their_requests_last_and_expire_after(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A replica that crashed leaves its leases behind: they expire, and the key is not locked out.
    monkeypatch.setattr(ratelimit, "LEASE_SECONDS", 0.6)
    limits = Limits(max_inflight=1)
    alive = RateLimiter(RateLimits(), RedisStore(redis_url, "t:", log=None))
    crashed = RateLimiter(RateLimits(), RedisStore(redis_url, "t:", log=None))
    try:
        await alive.admit("kept", limits, 0)
        await crashed.admit("lost", limits, 0)
        crashed._renewing.cancel()  # type: ignore[union-attr]  # it renews no more
        await asyncio.sleep(1.0)  # more than a lease's time to live
        with pytest.raises(RateLimited):
            await alive.admit("kept", limits, 0)  # renewed: still under way
        await alive.admit("lost", limits, 0)  # expired: the key has its room back
    finally:
        await alive.aclose()
        await crashed.aclose()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_lease_a_stalled_redis_took_late_is_given_back_and_the_key_is_not_locked_out(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, fail_open: bool
) -> None:
    """Redis stalls (a fork for a snapshot on a slow disk, a VM paused) longer than the gateway
    waits: the admission times out, the request goes on (or gets its 503), and Redis runs the
    admission when it wakes, taking a lease. Its request's end, itself written while Redis still
    stalls, gives it back once Redis answers again: the key is not refused for two minutes with
    nothing under way."""
    monkeypatch.setattr(ratelimit, "RELEASE_RETRIES", (0.5,) * 6)
    limits = Limits(max_inflight=1)
    limiter = RateLimiter(RateLimits(fail_open=fail_open), RedisStore(redis_url, "t:", log=get_logger()))
    client = redis.Redis.from_url(redis_url)
    server = int((await client.info("server"))["process_id"])
    try:
        limiter.settle(await limiter.admit("app", limits, 0), 0)  # a connection in the pool
        await asyncio.gather(*limiter._settling)
        os.kill(server, signal.SIGSTOP)  # it takes what is sent, and runs it when it wakes
        if fail_open:
            reservation = await limiter.admit("app", limits, 0)  # Redis's 1 s timeout: let through
            limiter.settle(reservation, 0)
        else:
            with pytest.raises(Unavailable):
                await limiter.admit("app", limits, 0)
        await asyncio.sleep(1.2)  # the request's end is not written either
        os.kill(server, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*limiter._settling), timeout=5)
        assert await client.zcard("t:app:inflight") == 0
        limiter.settle(await limiter.admit("app", limits, 0), 0)  # room for a request
    finally:
        os.kill(server, signal.SIGCONT)
        await client.aclose()
        await limiter.aclose()


async def test_unreachable_redis_fails_open_or_closed_as_configured() -> None:
    events: list[str] = []

    class Log:
        def error(self, event: str, **fields: object) -> None:
            events.append(event)

    url = "redis://127.0.0.1:9/0"  # discard port: nothing listens
    open_ = RateLimiter(RateLimits(fail_open=True), RedisStore(url, "t:", log=Log()))
    assert (await open_.admit("app", Limits(rpm=1), 0)).headers == {}
    closed = RateLimiter(RateLimits(fail_open=False), RedisStore(url, "t:", log=get_logger()))
    with pytest.raises(Unavailable, match="rate-limit store"):
        await closed.admit("app", Limits(rpm=1), 0)
    assert events == ["rate limit store unreachable"]
    await open_.aclose()
    await closed.aclose()


async def test_a_reload_that_changes_only_fail_open_keeps_the_connection_and_takes_effect() -> None:
    data: dict[str, Any] = {
        "backends": [{"name": "o", "type": "ollama"}],
        "models": [{"name": "m", "deployments": [{"backend": "o"}]}],
        "rate_limits": {"default": {"rpm": 5}, "redis_url": "redis://127.0.0.1:9/0", "fail_open": True},
    }
    state = State.build(parse_config(data, "a"), environ={})
    closed = {**data, "rate_limits": {**data["rate_limits"], "fail_open": False}}
    successor = state.successor(parse_config(closed, "b"), environ={})
    reopened = successor.successor(parse_config(data, "c"), environ={})
    try:
        assert successor.limiter.store is state.limiter.store is reopened.limiter.store
        assert (await state.limiter.admit("app", Limits(rpm=5), 0)).headers == {}
        with pytest.raises(Unavailable, match="fail_open is false"):
            await successor.limiter.admit("app", Limits(rpm=5), 0)
        assert (await reopened.limiter.admit("app", Limits(rpm=5), 0)).headers == {}
    finally:
        await state.aclose()
