"""Which instance serves a request, and what the gateway knows about each instance.

`order` ranks a plan's targets; the first is tried first, the next one on a retryable failure.
The ranking, from most to least important:

1. Health. An instance that failed `unhealthy_after` times in a row (requests or probes) is
   ejected for `cooldown` seconds, then gets one trial request (half-open): success brings it back,
   failure ejects it again. Ejected instances are only tried after every healthy one. An answer
   that it is busy (`busy`: its 429, Ollama's 'server busy') moves the request on, but is no failure.
2. The model. An instance whose inventory (`/api/tags`) lacks the model is never picked, unless no
   instance of the pool has it, so that Ollama's own 404 (with its pull hint) reaches the client.
3. Conversation affinity (`affinity: prefix`): requests of one conversation go to one instance, so
   its KV cache is reused, chosen by weighted rendezvous hashing so that adding or removing an
   instance moves only the conversations that were on it. Only instances with room, and with the
   model in memory when any has it, can be home; a home much busier than the idlest instance is
   skipped for the moment (`AFFINITY_SLACK`).
4. Room: instances at their `max_inflight` cap come after those with room.
5. The strategy, and warmth (the model in memory by `/api/ps`, not known, or to be loaded cold).
   least_inflight (the default) picks the fewest requests in flight per unit of weight, a cold
   load counting as `COLD_LOAD_COST` requests, so a warm instance is preferred until its queue
   costs more than a load elsewhere. latency (peak EWMA) multiplies the same queue by the
   instance's moving average of time to first token. round_robin and weighted (smooth weighted
   round robin: in any run of sum-of-weights requests, each instance gets exactly its weight,
   interleaved) know nothing of load: they take warm instances first, then their turn.
   bench/pool.py compares them on a simulated pool.

`acquire` takes a lease on an instance, waiting up to `routing.max_wait` seconds for room under its
`max_inflight` cap, then 429 with `retry-after`. When every instance of a pool is at its cap,
`room` waits instead for the first of them to have room, so that a request is not kept waiting on
the instance it was ranked onto while another one is free.

One balancer lives as long as the app: a config reload (`reconfigure`) adds and removes instances
and keeps what is known about those that stay, including the leases of requests still in flight.
Requests of the previous config may still name a removed instance: what they report about it is
ignored, `order` leaves it out, and `acquire` refuses it as unavailable, so a retry moves on.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import Gauge

from gateway.config import Config
from gateway.errors import RateLimited, UpstreamUnavailable
from gateway.metrics import Metrics
from gateway.policy import Target, listed_name

EWMA_WEIGHT = 0.3  # of the newest observation
# A cold model load, in requests' worth of waiting; unknown (no /api/ps yet) in between.
COLD_LOAD_COST = {True: 0.0, None: 0.5, False: 2.0}
WARMTH_RANK = {True: 0, None: 1, False: 2}
AFFINITY_SLACK = 2.0  # requests (on the strongest instance) a home may be busier than the idlest
LOAD_AWARE = ("least_inflight", "latency")


@dataclass(slots=True)
class Instance:
    weight: int
    max_inflight: int | None
    inflight_gauge: Gauge
    up_gauge: Gauge
    inflight: int = 0
    failures: int = 0  # consecutive
    ejected_until: float = 0.0  # 0: healthy
    trial: bool = False  # a half-open trial request is under way
    latency: float | None = None  # EWMA of time to first token, seconds
    available: frozenset[str] | None = None  # models it has; None: not known
    loaded: frozenset[str] | None = None  # models in memory now; None: not known
    answering: bool | None = None  # whether the latest probe was answered; None: none yet

    @property
    def saturated(self) -> bool:
        return self.max_inflight is not None and self.inflight >= self.max_inflight

    def has(self, model: str) -> bool | None:
        return None if self.available is None else listed_name(self.available, model) is not None

    def warm(self, model: str) -> bool | None:
        return None if self.loaded is None else listed_name(self.loaded, model) is not None

    def forget(self) -> None:
        """Everything learnt about the server, when a reload points the name at another one."""
        self.failures, self.ejected_until, self.trial = 0, 0.0, False
        self.latency = self.available = self.loaded = self.answering = None
        self.up_gauge.set(1)


class Lease:
    """One request's hold on an instance; `release` is idempotent, and works after a reload has
    removed the instance."""

    __slots__ = ("_balancer", "_instance", "backend", "released")

    def __init__(self, balancer: Balancer, backend: str, instance: Instance) -> None:
        self._balancer = balancer
        self._instance = instance
        self.backend = backend
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._balancer._release(self._instance)


def rendezvous(key: str, backend: str, weight: int = 1) -> float:
    """Weighted rendezvous score: the largest wins; an instance of weight w wins w times as often."""
    digest = hashlib.blake2b(f"{key}|{backend}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / 2.0**64  # in (0, 1]
    return -weight / math.log(unit) if unit < 1.0 else math.inf


class Balancer:
    def __init__(self, config: Config, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._turns: defaultdict[tuple[str, ...], int] = defaultdict(int)
        # Weighted round robin's credit of each place in a set of candidates: by place, not by
        # target, whose model may be any name a pattern route passes on (one entry per name, for good)
        self._credits: dict[tuple[str, ...], list[int]] = {}
        self._room = asyncio.Condition()
        self._waiting = 0  # requests waiting for room under a cap
        self._wakers: set[asyncio.Task[None]] = set()
        self.instances: dict[str, Instance] = {}
        self._config = config
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take a new config: instances it adds start healthy and unknown; those it removes are
        dropped (requests in flight on them finish and release normally); those it keeps, with
        the same type and URL, keep their health, latency, inventory and in-flight count."""
        routing = config.routing
        self.strategy = routing.strategy
        self.affinity = routing.affinity
        self.max_wait = routing.max_wait
        self._unhealthy_after = routing.health.unhealthy_after
        self._cooldown = routing.health.cooldown
        kept: dict[str, Instance] = {}
        for backend in config.backends:
            instance = self.instances.get(backend.name)
            if instance is None:
                instance = Instance(
                    backend.weight,
                    backend.max_inflight,
                    self._metrics.inflight.labels(backend.name),
                    self._metrics.backend_up.labels(backend.name),
                )
                instance.up_gauge.set(1)
            else:
                before = self._config.backend(backend.name)
                if (before.type, before.base_url) != (backend.type, backend.base_url):
                    instance.forget()
                instance.weight, instance.max_inflight = backend.weight, backend.max_inflight
            kept[backend.name] = instance
        self._metrics.keep_backends(kept.keys(), self.instances.keys() - kept.keys())
        self.instances = kept
        self._config = config
        if self._waiting:
            self._wake_waiters()  # a cap may have been raised

    # ---- what is known about each instance ----

    def inflight(self, backend: str) -> int:
        return self.instances[backend].inflight

    def healthy(self, backend: str) -> bool:
        return self.instances[backend].ejected_until == 0.0

    def up(self, backend: str) -> bool:
        """Readiness: the instance answered its latest probe and is not ejected. False until its
        first probe has answered."""
        instance = self.instances[backend]
        return instance.answering is True and instance.ejected_until == 0.0

    def usable(self, backend: str) -> bool:
        """Whether requests may go to the instance now: not ejected, or its cool-down is over and
        no trial is under way. False for an instance a reload has removed."""
        instance = self.instances.get(backend)
        return instance is not None and self._usable(instance, self._clock())

    def set_models(
        self, backend: str, available: Iterable[str] | None, loaded: Iterable[str] | None = None
    ) -> None:
        instance = self.instances[backend]
        instance.available = None if available is None else frozenset(available)
        instance.loaded = None if loaded is None else frozenset(loaded)

    def observe_latency(self, backend: str, seconds: float) -> None:
        instance = self.instances.get(backend)
        if instance is None:  # removed by a reload while the request ran
            return
        previous = instance.latency
        instance.latency = seconds if previous is None else previous + EWMA_WEIGHT * (seconds - previous)

    def succeeded(self, backend: str) -> None:
        instance = self.instances.get(backend)
        if instance is None:
            return
        instance.failures = 0
        instance.trial = False
        if instance.ejected_until:
            instance.ejected_until = 0.0
            instance.up_gauge.set(1)

    def failed(self, backend: str) -> None:
        instance = self.instances.get(backend)
        if instance is None:
            return
        instance.failures += 1
        if instance.trial or instance.failures >= self._unhealthy_after:
            instance.trial = False
            instance.ejected_until = self._clock() + self._cooldown
            instance.up_gauge.set(0)

    def lacks(self, backend: str, model: str) -> None:
        """The instance answered that it lacks `model` (Ollama's 404 after an `ollama rm`): its
        inventory says so until it is read again (`routing.health.interval`)."""
        instance = self.instances.get(backend)
        if instance is not None and instance.available is not None:
            name = listed_name(instance.available, model)
            if name is not None:
                instance.available = instance.available - {name}

    def undecided(self, backend: str) -> None:
        """The attempt says nothing of the instance's health: it answered that it has no room now
        (its 429, Ollama's 'server busy'), or the request ended before any verdict (the client
        left, a refusal of the request itself): neither a failure nor a success. A half-open
        trial ends without a verdict: the next request after it may be the trial."""
        instance = self.instances.get(backend)
        if instance is not None:
            instance.trial = False

    def probed(self, backend: str, ok: bool) -> None:
        """An active probe's result: a failure counts like a failed request; success after the
        cool-down brings an ejected instance back."""
        instance = self.instances.get(backend)
        if instance is None:  # removed by a reload while it was probed
            return
        instance.answering = ok
        if not ok:
            self.failed(backend)
        elif not instance.ejected_until or self._clock() >= instance.ejected_until:
            self.succeeded(backend)

    def _usable(self, instance: Instance, now: float) -> bool:
        if not instance.ejected_until:
            return True
        return now >= instance.ejected_until and not instance.trial  # half-open: one trial at a time

    # ---- choosing ----

    def order(self, targets: Sequence[Target], affinity: str | None = None) -> list[Target]:
        if len(targets) < 2:
            return list(targets)
        present = [t for t in targets if t.backend in self.instances]
        if len(present) < len(targets):  # a reload removed some since the plan was made
            if len(present) < 2:
                return present or list(targets)  # none left: `acquire` says so
            targets = present
        now = self._clock()
        with_model = [t for t in targets if self.instances[t.backend].has(t.model) is not False]
        candidates = with_model or list(targets)
        healthy = [t for t in candidates if self._usable(self.instances[t.backend], now)]
        ejected = [t for t in candidates if t not in healthy]
        ranked = self._rank(healthy)
        home = self._home(healthy, affinity) if affinity and self.affinity == "prefix" else None
        if home is not None:
            ranked.remove(home)
            ranked.insert(0, home)
        return ranked + sorted(ejected, key=lambda t: self.instances[t.backend].ejected_until)

    def _home(self, targets: list[Target], affinity: str) -> Target | None:
        """The conversation's instance: by weighted rendezvous hashing among those that have room
        and, if any has the model in memory, among those (a cold instance holds no cache). None
        when the home's queue is more than `AFFINITY_SLACK` requests longer than the shortest
        (a cold load included): waiting would cost more than evaluating the prompt again."""
        roomy = [t for t in targets if not self.instances[t.backend].saturated]
        warm = [t for t in roomy if self.instances[t.backend].warm(t.model)]
        pool = warm or roomy
        if not pool:
            return None
        instances = self.instances
        home = max(pool, key=lambda t: rendezvous(affinity, t.backend, instances[t.backend].weight))
        # The queue (a cold load counted in) in requests on the strongest instance: on one of
        # half its weight, each request counts twice.
        strongest = max(instances[t.backend].weight for t in roomy)

        def queue(t: Target) -> float:
            instance = instances[t.backend]
            return (instance.inflight + COLD_LOAD_COST[instance.warm(t.model)]) * strongest / instance.weight

        return home if queue(home) <= min(map(queue, roomy)) + AFFINITY_SLACK else None

    def _rank(self, targets: list[Target]) -> list[Target]:
        if not targets:
            return []
        # Rotating the start per set of candidates breaks ties fairly, so equal instances share
        # the load, and round robin takes turns among exactly the instances that can serve.
        candidates = tuple(t.backend for t in targets)
        turn = self._turns[candidates]
        self._turns[candidates] = turn + 1
        rotated = [targets[(turn + i) % len(targets)] for i in range(len(targets))]
        saturated = {t: self.instances[t.backend].saturated for t in rotated}
        if self.strategy in LOAD_AWARE:  # warmth is part of the score
            score = self._load_scores(rotated)
            return sorted(rotated, key=lambda t: (saturated[t], score[t]))
        tier = {t: (saturated[t], WARMTH_RANK[self.instances[t.backend].warm(t.model)]) for t in rotated}
        if self.strategy == "weighted":
            credits = self._credits.setdefault(candidates, [0] * len(targets))
            place = {t: i for i, t in enumerate(targets)}
            score = self._weighted_turn(credits, place, rotated, tier)
        else:
            score = {t: float(i) for i, t in enumerate(rotated)}
        return sorted(rotated, key=lambda t: (tier[t], score[t]))

    def _weighted_turn(
        self,
        credits: list[int],
        place: dict[Target, int],
        targets: list[Target],
        tier: dict[Target, tuple[bool, int]],
    ) -> dict[Target, float]:
        """Smooth weighted round robin, as nginx does it. Each turn, the instances of the best tier
        (room, then warmth) gain their weight in credit; the richest goes first and pays back the
        sum of their weights. Weights 1, 2, 3 give c b c a b c, never c c c b b a, and the same
        order in every run. An instance outside the best tier neither earns nor pays, so it does not
        come back with a backlog of turns."""
        best = min(tier.values())
        earners = [t for t in targets if tier[t] == best]
        weights = {t: self.instances[t.backend].weight for t in earners}
        for t, weight in weights.items():
            credits[place[t]] += weight
        first = max(earners, key=lambda t: credits[place[t]])
        credits[place[first]] -= sum(weights.values())
        score = {t: float(-credits[place[t]]) for t in targets}
        score[first] = -math.inf
        return score

    def _load_scores(self, targets: list[Target]) -> dict[Target, float]:
        instances = self.instances

        def queue(t: Target) -> float:
            """Requests this one would wait behind, a cold load counted as COLD_LOAD_COST more."""
            instance = instances[t.backend]
            return instance.inflight + 1 + COLD_LOAD_COST[instance.warm(t.model)]

        if self.strategy == "latency":
            # Expected wait: the EWMA of time to first token, times the queue (peak-EWMA). An
            # instance not measured yet counts as the average of those measured.
            measured = [instances[t.backend].latency for t in targets]
            known = [m for m in measured if m is not None]
            typical = sum(known) / len(known) if known else 1.0
            return {
                t: (m if m is not None else typical) * queue(t)
                for t, m in zip(targets, measured, strict=True)
            }
        return {t: queue(t) / instances[t.backend].weight for t in targets}

    # ---- leases ----

    def saturated(self, backend: str) -> bool:
        instance = self.instances.get(backend)
        return instance is not None and instance.saturated

    async def room(self, targets: Sequence[Target], affinity: str | None = None) -> list[Target]:
        """`targets` ranked again once one of those the ranking would use (with the model, not
        ejected) has room under its cap: for a request that found them all full. 429 when none has
        had room for `max_wait` seconds."""
        now = self._clock()
        present = [(t, self.instances[t.backend]) for t in targets if t.backend in self.instances]
        fit = [i for t, i in present if i.has(t.model) is not False and self._usable(i, now)]
        watched = fit or [i for _, i in present]
        names = ", ".join(t.backend for t, _ in present)
        await self._wait_for(
            lambda: not all(instance.saturated for instance in watched),
            f"backends {names} are all at their limits of requests in flight",
        )
        return self.order(targets, affinity)

    async def acquire(self, backend: str) -> Lease:
        instance = self.instances.get(backend)
        if instance is None:
            raise _removed(backend)
        if instance.saturated:
            await self._wait_for(
                lambda: not instance.saturated,
                f"backend {backend} is at its limit of {instance.max_inflight} requests in flight",
            )
            if self.instances.get(backend) is not instance:
                raise _removed(backend)
        if instance.ejected_until:
            instance.trial = True
        return self._lease(backend, instance)

    async def _wait_for(self, room: Callable[[], bool], full: str) -> None:
        """Until `room()`, for up to `max_wait` seconds; then 429, saying what was `full`."""
        self._waiting += 1
        try:
            async with asyncio.timeout(self.max_wait), self._room:
                await self._room.wait_for(room)
        except TimeoutError:
            raise RateLimited(
                f"{full}; retry after a few seconds",
                headers={"retry-after": str(max(1, math.ceil(self.max_wait)))},
            ) from None
        finally:
            self._waiting -= 1

    def lease(self, backend: str) -> Lease:
        return self._lease(backend, self.instances[backend])

    def _lease(self, backend: str, instance: Instance) -> Lease:
        instance.inflight += 1
        instance.inflight_gauge.inc()
        return Lease(self, backend, instance)

    def _release(self, instance: Instance) -> None:
        instance.inflight -= 1
        instance.inflight_gauge.dec()
        if self._waiting:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        task = asyncio.get_running_loop().create_task(self._wake())
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    async def _wake(self) -> None:
        async with self._room:
            self._room.notify_all()


def _removed(backend: str) -> UpstreamUnavailable:
    """A request of the previous config reached for an instance a reload has removed; retryable,
    so the request moves on to one that stays."""
    return UpstreamUnavailable(f"backend {backend} was removed from the gateway's config; retry the request")
