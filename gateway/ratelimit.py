"""Per-key rate limits: requests per minute and tokens per minute, as two token buckets, and
requests under way at once.

Each bucket holds up to one minute's budget and refills continuously at budget/60 per second, so
a key may burst its whole minute and then proceeds at the steady rate. A request is admitted when
the request bucket holds one request and the token bucket holds the request's estimated tokens
(prompt text at four bytes a token, plus its `max_tokens`); both are then debited together or not
at all. When the request ends, the estimate is replaced by the real count from the backend's
usage, so a bucket may go below zero and the next request waits for the debt to refill, which is
how a key that streams long answers is held to its tokens per minute.

`max_inflight` counts a key's requests from admission to their end, streams included: one more is
refused (429) until one of them has finished. It is checked with the buckets, and a refused
request takes nothing from them.

In memory by default, per process. With `rate_limits.redis_url` every replica shares one pair of
buckets per key: admission and settlement are single Lua scripts, so two gateways can never both
take the last request, and the clock is Redis's own, so replicas need not agree on the time. A
request under way holds a lease in a sorted set per key, which its end removes; leases are renewed
while their requests last and expire LEASE_SECONDS after a replica stopped renewing them (it
crashed). One whose admission or end Redis did not answer in time is given back again for about
a minute (RELEASE_RETRIES): a Redis that stalled, rather than refused, runs an admission it was
sent when it wakes, taking a lease that no request would ever give back. When Redis cannot be reached
the request is let through and the failure logged (`fail_open`), or refused with 503 when the
operator chose to fail closed.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import Limits, RateLimits
from gateway.errors import RateLimited, Unavailable

ANONYMOUS = "*"  # the bucket of an open gateway's callers; no key name can contain '*'
LEASE_SECONDS = 120  # a Redis lease of a request under way, renewed every third of it
# Pauses before giving a lease back again when Redis could not be asked at its request's end: it
# may only have stalled, and then run a late admission that took it. About a minute in all.
RELEASE_RETRIES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
CLOSE_GRACE = 1.5  # seconds that settlements still under way get at shutdown (one Redis timeout)


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket's state after a decision."""

    capacity: int
    level: float  # may be negative: tokens owed
    per_second: float

    @property
    def reset(self) -> float:
        """Seconds until the bucket is full again."""
        return max(self.capacity - self.level, 0.0) / self.per_second

    def wait(self, cost: float) -> float:
        return max(cost - self.level, 0.0) / self.per_second


@dataclass(frozen=True, slots=True)
class Verdict:
    requests: Bucket | None
    tokens: Bucket | None
    retry_after: float = 0.0  # 0 when admitted
    exhausted: str = ""  # "requests", "tokens" or "inflight" when refused

    def headers(self) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers for the limits this key has."""
        headers: dict[str, str] = {}
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(bucket.capacity)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(math.floor(bucket.level), 0))
                headers[f"x-ratelimit-reset-{kind}"] = duration(bucket.reset)
        return headers


def duration(seconds: float) -> str:
    """A span the way OpenAI writes it in `x-ratelimit-reset-*` (Go's notation): 120ms, 1.5s, 6m0s,
    1h40m6.962s."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{text}s"
    return f"{minutes}m{text}s" if minutes else f"{text}s"


def estimate(texts: list[str], extra: int | None) -> int:
    """Tokens a request may use, before the backend has counted them: about four bytes of text
    a token, plus `extra` (what it may generate, or ids it sent already tokenized)."""
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    return math.ceil(size / 4) + (extra or 0)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an admitted request took from its key's buckets, to be settled when it ends."""

    key: str
    limits: Limits
    cost: int  # estimated tokens debited
    headers: dict[str, str]
    lease: str = ""  # the request's place among the key's requests under way (max_inflight)


class StoreUnreachable(Exception):
    """The store could not be asked; the limiter's config says whether to let the request through.
    `stalled`: it did not answer in time, so it may yet run what it was sent."""

    def __init__(self, stalled: bool = False) -> None:
        super().__init__()
        self.stalled = stalled


class Store(Protocol):
    leases_expire: bool  # whether leases must be renewed while their requests last

    async def admit(self, key: str, limits: Limits, cost: int, lease: str) -> Verdict:
        """Admit the request (debiting the buckets, and holding `lease` under max_inflight) or refuse it."""
        ...

    def settle(self, key: str, limits: Limits, tokens: int, lease: str) -> Awaitable[None] | None:
        """Debit `tokens` more (a refund when negative) and give `lease` back: done at once (None),
        or what to await."""
        ...

    async def renew(self, leases: Collection[tuple[str, str]]) -> None:
        """Keep the (key, lease) pairs of the requests still under way from expiring."""
        ...

    async def aclose(self) -> None: ...


class MemoryStore:
    """Buckets in this process: (level, when) per key and kind."""

    leases_expire = False

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._inflight: dict[str, int] = {}  # requests under way, of the keys with max_inflight

    def _level(self, key: str, kind: str, capacity: int, now: float) -> float:
        level, at = self._buckets.get((key, kind), (float(capacity), now))
        return min(float(capacity), level + (now - at) * capacity / 60)

    async def admit(self, key: str, limits: Limits, cost: int, lease: str) -> Verdict:
        now = self._clock()
        requests = tokens = None
        if limits.rpm:
            requests = Bucket(limits.rpm, self._level(key, "r", limits.rpm, now), limits.rpm / 60)
        if limits.tpm:
            tokens = Bucket(limits.tpm, self._level(key, "t", limits.tpm, now), limits.tpm / 60)
        if limits.max_inflight and self._inflight.get(key, 0) >= limits.max_inflight:
            return Verdict(requests, tokens, INFLIGHT_WAIT, "inflight")
        verdict = decide(requests, tokens, cost)
        if not verdict.retry_after:
            if verdict.requests is not None:
                self._buckets[key, "r"] = (verdict.requests.level, now)
            if verdict.tokens is not None:
                self._buckets[key, "t"] = (verdict.tokens.level, now)
            if limits.max_inflight:
                self._inflight[key] = self._inflight.get(key, 0) + 1
        return verdict

    def settle(self, key: str, limits: Limits, tokens: int, lease: str) -> None:
        if limits.tpm and tokens:
            now = self._clock()
            self._buckets[key, "t"] = (self._level(key, "t", limits.tpm, now) - tokens, now)
        if lease:
            left = self._inflight.get(key, 0) - 1
            if left > 0:
                self._inflight[key] = left
            else:
                self._inflight.pop(key, None)

    async def renew(self, leases: Collection[tuple[str, str]]) -> None:
        return None  # a process's own count: nothing expires

    async def aclose(self) -> None:
        return None


INFLIGHT_WAIT = 1.0  # the retry-after of a key at its max_inflight: requests end at any moment


def decide(requests: Bucket | None, tokens: Bucket | None, cost: int) -> Verdict:
    """Admit (debiting both buckets) or refuse (with the wait until both would admit)."""
    waits = {
        "requests": requests.wait(1) if requests is not None else 0.0,
        "tokens": tokens.wait(cost) if tokens is not None else 0.0,
    }
    exhausted = max(waits, key=lambda kind: waits[kind])
    if waits[exhausted] > 0:
        return Verdict(requests, tokens, waits[exhausted], exhausted)
    return Verdict(
        Bucket(requests.capacity, requests.level - 1, requests.per_second) if requests else None,
        Bucket(tokens.capacity, tokens.level - cost, tokens.per_second) if tokens else None,
    )


# Both scripts read the level of a bucket as stored level + refill since it was stored, capped at
# the capacity; a key that is absent is a full bucket (keys expire once they would be full). Time
# is kept in whole microseconds, as Redis's TIME gives it: Lua's tostring keeps 14 digits, which
# rounds seconds since 1970 to a tenth of a millisecond, and a level stored with a time up to 50 µs
# ahead reads 0.99999... a few microseconds later, refusing a request the bucket has room for.
# Numbers go back as strings with every digit: Redis would truncate a Lua number to an integer.
_LEVEL = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local function exact(x) return string.format('%.17g', x) end
local function level(key, capacity)
  if capacity <= 0 then return 0 end
  local stored = redis.call('HMGET', key, 'level', 'at_us')
  if not stored[1] or not stored[2] then return capacity end
  return math.min(capacity, tonumber(stored[1]) + (now - tonumber(stored[2])) * capacity / 60000000)
end
local function store(key, capacity, value)
  redis.call('HSET', key, 'level', exact(value), 'at_us', string.format('%d', now))
  redis.call('PEXPIRE', key, math.ceil((capacity - value) * 60000 / capacity) + 1000)
end
"""

# The requests under way of a key with max_inflight: a sorted set of leases, each scored with the
# time (µs) it expires unless renewed; expired ones are dropped before counting.
_LEASES = """
local function hold(key, lease, ttl_us)
  redis.call('ZADD', key, now + ttl_us, lease)
  redis.call('PEXPIRE', key, math.ceil(ttl_us / 1000) + 1000)
end
"""

# KEYS: request bucket, token bucket, leases. ARGV: rpm, tpm (0: no such limit), cost in tokens,
# max_inflight (0: none), the lease, its time to live in µs. Returns admitted, the two levels, and
# whether the key was at its max_inflight.
_ADMIT = (
    _LEVEL
    + _LEASES
    + """
local rpm, tpm, cost, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local requests, tokens = level(KEYS[1], rpm), level(KEYS[2], tpm)
local full = false
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  full = redis.call('ZCARD', KEYS[3]) >= most
end
local admitted = not full and (rpm == 0 or requests >= 1) and (tpm == 0 or tokens >= cost)
if admitted then
  if rpm > 0 then requests = requests - 1; store(KEYS[1], rpm, requests) end
  if tpm > 0 then tokens = tokens - cost; store(KEYS[2], tpm, tokens) end
  if most > 0 then hold(KEYS[3], ARGV[5], tonumber(ARGV[6])) end
end
return {admitted and 1 or 0, exact(requests), exact(tokens), full and 1 or 0}
"""
)

# KEYS: token bucket, leases. ARGV: tpm, tokens to debit (negative: a refund; 0: none), the lease
# to give back ('': none).
_SETTLE = (
    _LEVEL
    + """
local tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and tokens ~= 0 then store(KEYS[1], tpm, level(KEYS[1], tpm) - tokens) end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
return 1
"""
)

# KEYS: the leases' sets. ARGV: the time to live in µs, then one lease per key. A lease already
# gone (expired, or its request ended meanwhile) is not put back.
_RENEW = (
    _LEVEL
    + """
local ttl_us = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', now + ttl_us, ARGV[i + 1]) == 1 then
    redis.call('PEXPIRE', key, math.ceil(ttl_us / 1000) + 1000)
  end
end
return 1
"""
)


class RedisStore:
    """Buckets in Redis, shared by every gateway that names the same server and prefix."""

    leases_expire = True

    def __init__(self, url: str, prefix: str, *, log: Any) -> None:
        import redis.asyncio as redis  # noqa: PLC0415 (134 ms) only operators who configure Redis pay for the import

        self._client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._admit = self._client.register_script(_ADMIT)
        self._settle = self._client.register_script(_SETTLE)
        self._renew = self._client.register_script(_RENEW)
        self._prefix = prefix
        self._log = log
        self._errors = redis.RedisError
        self._timeouts = (TimeoutError, redis.TimeoutError)

    def _keys(self, key: str) -> list[str]:
        return [f"{self._prefix}{key}:requests", f"{self._prefix}{key}:tokens", self._leases(key)]

    def _leases(self, key: str) -> str:
        return f"{self._prefix}{key}:inflight"

    async def admit(self, key: str, limits: Limits, cost: int, lease: str) -> Verdict:
        """The verdict from Redis; raises StoreUnreachable (logged) when Redis cannot be asked."""
        most = limits.max_inflight or 0
        try:
            admitted, requests, tokens, full = await self._admit(
                keys=self._keys(key),
                args=[limits.rpm or 0, limits.tpm or 0, cost, most, lease, LEASE_SECONDS * 1_000_000],
            )
        except (self._errors, OSError) as error:
            self._log.error("rate limit store unreachable", error=type(error).__name__)
            raise StoreUnreachable(isinstance(error, self._timeouts)) from None
        # The script's levels are after the debit when admitted, before it when not.
        request_bucket = Bucket(limits.rpm, float(requests), limits.rpm / 60) if limits.rpm else None
        token_bucket = Bucket(limits.tpm, float(tokens), limits.tpm / 60) if limits.tpm else None
        if admitted:
            return Verdict(request_bucket, token_bucket)
        if full:
            return Verdict(request_bucket, token_bucket, INFLIGHT_WAIT, "inflight")
        return decide(request_bucket, token_bucket, cost)

    def settle(self, key: str, limits: Limits, tokens: int, lease: str) -> Awaitable[None] | None:
        debit = tokens if limits.tpm else 0
        if not debit and not lease:
            return None
        return self._settled(self._keys(key)[1:], [limits.tpm or 0, debit, lease])

    async def _settled(self, keys: list[str], args: list[Any]) -> None:
        try:
            await self._settle(keys=keys, args=args)
            return
        except (self._errors, OSError) as error:
            self._log.error("rate limit store unreachable", error=type(error).__name__)
            if not isinstance(error, self._timeouts):  # refused: nothing was run, nor will be
                return
        tpm, _, lease = args
        if not lease:
            return
        # Only the lease is given back again: the debit may have been made by a Redis that stalled.
        for pause in RELEASE_RETRIES:
            await asyncio.sleep(pause)
            try:
                await self._settle(keys=keys, args=[tpm, 0, lease])
                return
            except (self._errors, OSError):
                continue

    async def renew(self, leases: Collection[tuple[str, str]]) -> None:
        keys = [self._leases(key) for key, _ in leases]
        try:
            await self._renew(keys=keys, args=[LEASE_SECONDS * 1_000_000, *(lease for _, lease in leases)])
        except (self._errors, OSError) as error:
            self._log.error("rate limit store unreachable", error=type(error).__name__)

    async def aclose(self) -> None:
        await self._client.aclose()


def _lease() -> str:
    return os.urandom(9).hex()


def _who(key: str) -> str:
    return "callers without an API key" if key == ANONYMOUS else f"the API key '{key}'"


class RateLimiter:
    """The limits of the current config over a store that outlives reloads."""

    def __init__(self, config: RateLimits, store: Store) -> None:
        self.config = config
        self.store = store
        self._settling: set[asyncio.Task[None]] = set()
        self._leases: dict[str, str] = {}  # lease -> key: the requests under way that hold one
        self._renewing: asyncio.Task[None] | None = None

    @classmethod
    def build(cls, config: RateLimits, log: Any) -> RateLimiter:
        store: Store = (
            RedisStore(config.redis_url, config.redis_prefix, log=log) if config.redis_url else MemoryStore()
        )
        return cls(config, store)

    def shares_store(self, config: RateLimits) -> bool:
        """Whether a reloaded `config` keeps this store (`fail_open` and the limits are read from
        the limiter's config at each request, so they change without a new store)."""
        return (config.redis_url, config.redis_prefix) == (self.config.redis_url, self.config.redis_prefix)

    def limits(self, key_limits: Limits | None) -> Limits | None:
        limits = key_limits or self.config.default
        return limits if limits.limiting else None

    async def admit(self, key: str, limits: Limits, cost: int) -> Reservation:
        """Take one request and `cost` tokens from the key's buckets, or raise RateLimited (429)
        saying how long to wait."""
        if limits.tpm and cost > limits.tpm:
            raise RateLimited(
                f"Request too large for {_who(key)}: it may use {cost} tokens (prompt estimate plus"
                f" max_tokens for each of its n choices) and the limit is {limits.tpm} tokens per"
                " minute. Send less text or a smaller max_tokens.",
                code="rate_limit_exceeded",
                headers={"x-should-retry": "false"},
            )
        lease = _lease() if limits.max_inflight else ""
        try:
            verdict = await self.store.admit(key, limits, cost, lease)
        except StoreUnreachable as failure:
            # A Redis that stalled (rather than refused) runs the admission when it wakes, taking
            # a lease no one would give back: the lease stays the request's, to be given back at
            # its end (renewing or removing one that was never taken changes nothing).
            lease = lease if failure.stalled else ""
            if not self.config.fail_open:
                if lease:
                    self.settle(Reservation(key, limits, 0, {}, lease), 0)
                raise Unavailable(
                    "The rate-limit store (Redis) is unreachable, and rate_limits.fail_open is false."
                ) from None
            if lease:
                self._hold(key, lease)
            return Reservation(key, limits, 0, {}, lease)  # no tokens counted as taken
        if verdict.exhausted == "inflight":
            raise RateLimited(
                f"Too many requests under way for {_who(key)}: limit {limits.max_inflight} at once."
                " Please try again when one of them has finished.",
                code="rate_limit_exceeded",
                headers={"retry-after": "1", "retry-after-ms": "1000", **verdict.headers()},
            )
        if verdict.retry_after:
            unit = "requests" if verdict.exhausted == "requests" else "tokens"
            limit = limits.rpm if unit == "requests" else limits.tpm
            raise RateLimited(
                f"Rate limit reached for {_who(key)} on {unit} per minute: limit {limit}."
                f" Please try again in {duration(verdict.retry_after)}.",
                code="rate_limit_exceeded",
                headers={
                    "retry-after": str(max(1, math.ceil(verdict.retry_after))),
                    "retry-after-ms": str(math.ceil(verdict.retry_after * 1000)),
                    **verdict.headers(),
                },
            )
        if lease:
            self._hold(key, lease)
        return Reservation(key, limits, cost, verdict.headers(), lease)

    def settle(self, reservation: Reservation, used: int) -> None:
        """Replace the estimate by the `used` tokens and end the request's lease (in memory at
        once; with Redis in the background: the answer has gone)."""
        if reservation.lease:
            self._leases.pop(reservation.lease, None)
        tokens = used - reservation.cost
        settling = self.store.settle(reservation.key, reservation.limits, tokens, reservation.lease)
        if settling is None:
            return
        task: asyncio.Task[None] = asyncio.ensure_future(settling)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _hold(self, key: str, lease: str) -> None:
        if not self.store.leases_expire:
            return
        self._leases[lease] = key
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """While requests hold leases, renew them every third of their time to live."""
        while self._leases:
            await asyncio.sleep(LEASE_SECONDS / 3)
            if self._leases:
                await self.store.renew([(key, lease) for lease, key in self._leases.items()])

    async def aclose(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
        if self._settling:  # not a lease's retries for a minute: they expire in Redis anyway
            _, late = await asyncio.wait(self._settling, timeout=CLOSE_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self.store.aclose()
