"""Every instrument the gateway exports (DESIGN.md's table), defined once on a registry per app.

With `serve --workers N`, every worker process records into files in a shared directory and
`/metrics` on any worker reports the sum over all of them (prometheus_client's multiprocess mode).

Label values come from the config only (model = configured client-facing name or "", backend =
instance name, key = an API key's name), so no request can create new series.
"""

from __future__ import annotations

import glob
import os
from bisect import bisect_left
from collections.abc import Collection, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
# No `*_created` series beside every counter and histogram: nothing on the dashboard uses them,
# and they would double the series Prometheus stores (multiprocess mode never has them).
disable_created_metrics()  # type: ignore[no-untyped-call]
# prometheus_client's switch: set before it is imported, every process writes its values to files
# in this directory, and `render` merges them. `serve --workers N` sets it up.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class LoopValue:
    """A metric value without a lock. prometheus_client's default value takes a mutex on every
    update, which made recording a request's metrics five times dearer; the gateway updates and
    reads its metrics on its event loop's thread only (`/metrics` is served there too), so the
    mutex guards nothing. With several workers each process writes files instead (multiprocess
    mode chooses that value class when the module is imported), and this is not used."""

    _multiprocess = False
    __slots__ = ("_exemplar", "_value")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._value = 0.0
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def get(self) -> float:
        return self._value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get_exemplar(self) -> Any:
        return self._exemplar


if values.ValueClass is values.MutexValue:  # single-process mode: every metric made from now on
    values.ValueClass = LoopValue


class _Count:
    """A bound counter's `inc`, minus the check prometheus_client makes on every call that the
    metric has its labels (a bound child always has)."""

    __slots__ = ("_value",)

    def __init__(self, child: Any) -> None:
        self._value = child._value

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self._value.inc(amount)


class _Observe:
    """A bound histogram's `observe`: the same values updated, its bucket found by bisection."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._sum = child._sum
        self._buckets = child._buckets
        self._bounds = child._upper_bounds  # ascending, the last one +Inf

    def observe(self, amount: float) -> None:
        self._sum.inc(amount)
        self._buckets[bisect_left(self._bounds, amount)].inc(1)


DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total", "Requests answered, by outcome status.",
            ["endpoint", "model", "backend", "status"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Time from arrival to the last byte sent.",
            ["endpoint", "model", "backend", "stream"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds", "Streaming: arrival to the first content or tool call.",
            ["model", "backend"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "gateway_time_per_output_token_seconds", "Streaming: time per output token after the first.",
            ["model", "backend"], buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "gateway_tokens_total", "Tokens as the backend counted them.",
            ["model", "backend", "type"], registry=r,
        )  # fmt: skip
        # With several workers, each process writes its own values (see `multiprocess_dir`):
        # in-flight requests add up over the live workers; a backend is up while any worker finds it so.
        self.inflight = Gauge(
            "gateway_inflight_requests", "Requests holding a backend right now.", ["backend"], registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.backend_up = Gauge(
            "gateway_backend_up", "0 while the backend is ejected (failures in a row), else 1.", ["backend"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total", "Backend failures by kind.", ["backend", "reason"], registry=r
        )
        self.retries = Counter(
            "gateway_retries_total", "Attempts moved to another instance.", ["backend"], registry=r
        )
        self.fallbacks = Counter(
            "gateway_fallbacks_total",
            "Requests served by a fallback model.",
            ["from_model", "to_model"],
            registry=r,
        )
        self.privacy = Counter(
            "gateway_privacy_decisions_total",
            "Privacy classification of requests.",
            ["privacy", "reason"],
            registry=r,
        )
        self.audit_failures = Counter(
            "gateway_audit_write_failures_total",
            "Requests whose audit record could not be written (privacy.audit_log).",
            registry=r,
        )
        # Per API key (names from the config, as `model` and `backend`): what each team used.
        self.key_requests = Counter(
            "gateway_key_requests_total", "Requests made with each API key, by outcome status.",
            ["key", "status"], registry=r,
        )  # fmt: skip
        self.key_tokens = Counter(
            "gateway_key_tokens_total", "Tokens as the backend counted them, by the API key that asked.",
            ["key", "type"], registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "gateway_overhead_seconds", "Time spent in the gateway itself, upstream waits excluded.",
            ["endpoint"], buckets=OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip

        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._backends: frozenset[str] | None = None  # the config's, once the balancer has taken it

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, bound once and kept: `labels` costs a lock and a lookup per
        call. The label values come from the config and a few status codes, so this stays small."""
        key = (metric, labels)
        bound = self._children.get(key)
        if bound is None:
            child = metric.labels(*labels)
            bound = _Observe(child) if isinstance(metric, Histogram) else _Count(child)
            self._children[key] = bound
        return bound

    def register_backends(self, names: list[str]) -> None:
        """Make the per-backend gauges exist from the start, so dashboards show zero, not nothing."""
        for name in names:
            self.inflight.labels(name)
            self.backend_up.labels(name)

    def keep_backends(self, current: Collection[str], removed: Iterable[str]) -> None:
        """The config's backends are `current` now: the in-flight and up gauges of those a reload
        `removed` go from /metrics. With several workers those values live in the shared files,
        where a series cannot be removed (prometheus_client only warns), and a removed backend
        would be reported as it last was for good, down ones firing their alert: `render` leaves
        out every backend that is not in `current`."""
        self._backends = frozenset(current)
        if os.environ.get(MULTIPROC_ENV):
            return
        for name in removed:
            self.inflight.remove(name)
            self.backend_up.remove(name)

    def render(self) -> bytes:
        """This process's metrics, or, with several workers, every worker's added up."""
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        files = multiprocess.MultiProcessCollector(None, directory)  # type: ignore[no-untyped-call]
        merged.register(_OfBackends(files, self._backends))
        return generate_latest(merged)


PER_BACKEND_GAUGES = ("gateway_inflight_requests", "gateway_backend_up")


class _OfBackends(Collector):
    """The workers' merged metrics, the per-backend gauges of the config's backends only."""

    def __init__(self, source: Collector, backends: frozenset[str] | None) -> None:
        self._source = source
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            if self._backends is not None and family.name in PER_BACKEND_GAUGES:
                family.samples = [s for s in family.samples if s.labels.get("backend") in self._backends]
            yield family


def worker_exited(pid: int) -> None:
    """Drop a finished worker's live gauges (in-flight, up) from the merged view."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def forget_dead_workers() -> None:
    """Drop the live gauges of workers that died without finishing (killed, crashed): a dead
    worker's in-flight requests and backends up would stay in the merged view for good. Each
    worker does it as it starts, as uvicorn starts one in a dead one's place."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = path.removesuffix(".db").rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True
