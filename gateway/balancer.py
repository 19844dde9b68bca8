"""Which instance serves a request: orders a plan's targets and holds in-flight leases.

Strategies (DESIGN.md): least_inflight (default), round_robin, weighted, latency. The order is
the order retries take: the first target is tried first, the next one on a retryable failure.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from gateway.config import Routing
from gateway.metrics import Metrics
from gateway.policy import Target


class Lease:
    """One request's hold on a backend; `release` is idempotent."""

    __slots__ = ("_balancer", "backend", "released")

    def __init__(self, balancer: Balancer, backend: str) -> None:
        self._balancer = balancer
        self.backend = backend
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._balancer._release(self.backend)


class Balancer:
    def __init__(self, routing: Routing, weights: dict[str, int], metrics: Metrics) -> None:
        self._strategy = routing.strategy
        self._weights = weights
        self._inflight = dict.fromkeys(weights, 0)
        self._gauges = {name: metrics.inflight.labels(name) for name in weights}
        self._turn = itertools.count()
        self._random = random.Random()

    def inflight(self, backend: str) -> int:
        return self._inflight[backend]

    def order(self, targets: Sequence[Target]) -> list[Target]:
        if len(targets) < 2:
            return list(targets)
        turn = next(self._turn)
        # Rotating the start breaks ties fairly, so equal instances share the load.
        rotated = [targets[(turn + i) % len(targets)] for i in range(len(targets))]
        if self._strategy == "round_robin":
            return rotated
        if self._strategy == "weighted":
            return self._weighted(rotated)
        return sorted(rotated, key=lambda t: self._inflight[t.backend] / self._weights[t.backend])

    def _weighted(self, targets: list[Target]) -> list[Target]:
        remaining = list(targets)
        ordered = []
        while remaining:
            weights = [self._weights[t.backend] for t in remaining]
            pick = self._random.choices(range(len(remaining)), weights)[0]
            ordered.append(remaining.pop(pick))
        return ordered

    def lease(self, backend: str) -> Lease:
        self._inflight[backend] += 1
        self._gauges[backend].inc()
        return Lease(self, backend)

    def _release(self, backend: str) -> None:
        self._inflight[backend] -= 1
        self._gauges[backend].dec()
