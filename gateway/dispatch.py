"""One request's journey to a backend: plans -> lease -> provider, retrying on another instance.

A request comes with one or more plans: the model's own, then its fallbacks (public traffic only).
Within a plan, a retryable failure moves to another instance (at most `retries` times); when every
instance of a plan has failed that way, the next plan is tried. All of it happens only before
anything has reached the client: a stream is "opened" when its first chunk has arrived, and that
peek happens inside the retry scope. After that the stream is handed to relay, and a failure
becomes an error event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.balancer import Balancer
from gateway.deadlines import Deadlines
from gateway.errors import (
    NOT_SENT,
    GatewayError,
    ModelMissing,
    StreamOverTime,
    UpstreamError,
    UpstreamProtocol,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    quoting,
)
from gateway.exchange import Exchange
from gateway.metrics import Metrics
from gateway.policy import Plan, Target, is_cloud_name
from gateway.providers.base import Provider
from gateway.relay import StreamSource
from gateway.schemas import ChatRequest, Completion, EmbeddingRequest, Embeddings

T = TypeVar("T")


def _answer_deadline(provider: Provider) -> float:
    """Without a stream the first token comes with the whole answer: its deadline, within the total."""
    timeouts = provider.backend.timeouts
    return min(timeouts.first_token, timeouts.total)


async def _waited_for(preparing: Awaitable[object], exchange: Exchange) -> None:
    """A provider's preparation (fetching image URLs): a wait on other servers, as the backend's
    is, so not the gateway's own time (`gateway_overhead_seconds`)."""
    started = time.perf_counter()
    try:
        await preparing
    finally:
        exchange.upstream_seconds += time.perf_counter() - started


def _failed_closed(error: GatewayError, tried: list[Target], exchange: Exchange) -> UpstreamError:
    """A private request's last failure, told as what it is: every local deployment tried has
    failed, and no cloud backend will be. 503, or 504 when the last one ran out of time."""
    backends = ", ".join(dict.fromkeys(target.backend for target in tried))
    message = (
        f"No local backend could serve this private request (reason: {exchange.privacy_reason});"
        f" tried {backends}, and the last said: {error.message.rstrip('.')}. Private requests are never"
        " sent to a cloud backend."
    )
    failed = UpstreamTimeout(message) if isinstance(error, UpstreamTimeout) else UpstreamUnavailable(message)
    return quoting(failed, error.quoted) if error.quoted else failed


@dataclass(slots=True)
class Dispatcher:
    providers: dict[str, Provider]
    balancer: Balancer
    metrics: Metrics
    retries: int
    deadlines: Deadlines = field(default_factory=Deadlines)

    async def _first_success(
        self, plans: list[Plan], exchange: Exchange, attempt_one: Callable[[Target, Provider], Awaitable[T]]
    ) -> T:
        """Each plan in turn until one succeeds; a plan's non-retryable failure is final. Within a
        plan, its targets in the balancer's order until one succeeds or a failure is final, each
        attempt a plain call from here: no coroutine in between, and no retry library's state.
        (tenacity's kept the last error, whose traceback held that state in turn: a reference
        cycle that kept the request, its sockets included, until the collector's rare full run.)"""
        last = len(plans) - 1
        for index, plan in enumerate(plans):
            if index:
                exchange.notes["fallback_from"] = plans[0].label
            exchange.answered_as = plan.requested
            targets = self.balancer.order(plan.targets, exchange.affinity)
            if len(targets) > 1 and self.balancer.saturated(targets[0].backend):  # so are the others
                targets = await self.balancer.room(targets, exchange.affinity)
            attempts = min(self.retries + 1, len(targets))
            try:
                for number in range(attempts):
                    try:
                        result = await self._attempt(targets[number], exchange, attempt_one)
                    except GatewayError as error:
                        if number == attempts - 1 or not error.retryable:
                            raise
                        self.metrics.child(self.metrics.retries, targets[number].backend).inc()
                    else:
                        return self._served(plans, index, result)
            except GatewayError as error:
                if not error.retryable:
                    raise
                if exchange.privacy == "private" and isinstance(error, UpstreamError):
                    # one plan, all local, and they failed: say why it ends here (a model missing on
                    # every one stays Ollama's 404, with its pull hint)
                    raise _failed_closed(error, targets[:attempts], exchange) from error
                if index == last:
                    raise
        raise AssertionError("unreachable: the last plan's failure is raised")

    def _served(self, plans: list[Plan], index: int, result: T) -> T:
        """A plan's answer. `gateway_fallbacks_total` counts the requests a fallback served, so
        only the fallback that answered: not one tried that failed too."""
        if index:
            self.metrics.child(self.metrics.fallbacks, plans[0].label, plans[index].label).inc()
        return result

    async def _attempt(
        self, target: Target, exchange: Exchange, attempt_one: Callable[[Target, Provider], Awaitable[T]]
    ) -> T:
        provider = self.providers[target.backend]
        exchange.backend = target.backend
        exchange.served_model = target.model
        exchange.local = provider.backend.local and not is_cloud_name(target.model)
        try:
            result = await attempt_one(target, provider)
        except UpstreamError as error:
            self.metrics.child(self.metrics.upstream_errors, target.backend, error.reason).inc()
            if isinstance(error, UpstreamRejected) and error.busy:
                self.balancer.undecided(target.backend)  # full for now, alive: the request moves on
            elif error.retryable:
                self.balancer.failed(target.backend)
            else:  # it answered, if only to refuse: the instance itself is fine
                self.balancer.succeeded(target.backend)
            raise
        except ModelMissing:  # the next requests for the model go elsewhere until its inventory is read
            self.balancer.lacks(target.backend, target.model)
            self.balancer.undecided(target.backend)
            raise
        except BaseException:  # cancelled, or refused before or apart from the backend's health
            self.balancer.undecided(target.backend)
            raise
        return result

    async def _unary(
        self,
        target: Target,
        exchange: Exchange,
        call: Callable[[], Awaitable[T]],
        total: float,
        preparing: Awaitable[object] | None = None,
    ) -> T:
        """`preparing`: the provider's preparation (`Provider.prepare`), awaited first: outside the
        lease and the deadline."""
        if preparing is not None:
            await _waited_for(preparing, exchange)
        waited = time.perf_counter()
        lease = await self.balancer.acquire(target.backend)
        deadline = self.deadlines.start(total)
        sent = True
        try:
            result = await call()
            self.balancer.observe_latency(target.backend, time.perf_counter() - waited)
            self.balancer.succeeded(target.backend)
            return result
        except NOT_SENT:
            sent = False  # refused, not taken in time, or closed before answering: no work done
            raise
        except asyncio.CancelledError:
            if deadline.timed_out():
                raise UpstreamTimeout(
                    f"backend {target.backend} did not answer within its first-token deadline"
                ) from None
            raise
        finally:
            deadline.end()
            exchange.upstream_seconds += time.perf_counter() - waited
            lease.release()
            if sent:
                exchange.reached = True

    def complete(self, plans: list[Plan], request: ChatRequest, exchange: Exchange) -> Awaitable[Completion]:
        """Awaited by the caller; not a coroutine itself, so not one more layer (`_first_success`)."""

        def one(target: Target, provider: Provider) -> Awaitable[Completion]:
            return self._unary(
                target,
                exchange,
                lambda: provider.complete(request, target.model),
                _answer_deadline(provider),
                provider.prepare(request),
            )

        return self._first_success(plans, exchange, one)

    def embed(
        self, plans: list[Plan], request: EmbeddingRequest, exchange: Exchange
    ) -> Awaitable[Embeddings]:
        async def checked(target: Target, provider: Provider) -> Embeddings:
            result = await provider.embed(request, target.model)
            if len(result.vectors) != request.inputs():
                raise UpstreamProtocol(
                    f"backend {target.backend} returned {len(result.vectors)} vectors for "
                    f"{request.inputs()} inputs"
                )
            return result

        def one(target: Target, provider: Provider) -> Awaitable[Embeddings]:
            return self._unary(
                target, exchange, lambda: checked(target, provider), _answer_deadline(provider)
            )

        return self._first_success(plans, exchange, one)

    def open_stream(
        self, plans: list[Plan], request: ChatRequest, exchange: Exchange
    ) -> Awaitable[StreamSource]:
        def one(target: Target, provider: Provider) -> Awaitable[StreamSource]:
            return self._open(target, provider, request, exchange)

        return self._first_success(plans, exchange, one)

    async def _open(
        self, target: Target, provider: Provider, request: ChatRequest, exchange: Exchange
    ) -> StreamSource:
        if (preparing := provider.prepare(request)) is not None:  # outside the lease and deadline
            await _waited_for(preparing, exchange)
        timeouts = provider.backend.timeouts
        waited = time.perf_counter()
        lease = await self.balancer.acquire(target.backend)
        stream: Any = provider.stream(request, target.model)
        deadline = self.deadlines.start(min(timeouts.first_token, timeouts.total))
        try:
            try:
                first = await anext(stream)
            finally:
                deadline.end()
            self.balancer.observe_latency(target.backend, time.perf_counter() - waited)
            exchange.reached = True
        except BaseException as error:
            if not isinstance(error, NOT_SENT):
                exchange.reached = True
            timed_out = isinstance(error, asyncio.CancelledError) and deadline.timed_out()
            await stream.aclose()
            lease.release()
            if timed_out:
                raise UpstreamTimeout(
                    f"backend {target.backend} sent nothing within its first-token deadline"
                ) from None
            if isinstance(error, StopAsyncIteration):
                raise UpstreamProtocol(
                    f"backend {target.backend} ended the stream before any chunk"
                ) from None
            raise
        finally:
            exchange.upstream_seconds += time.perf_counter() - waited

        def closed(failure: UpstreamError | None) -> None:
            """A stream's outcome counts for its instance's health at its end, not at its first
            chunk: an instance that breaks streams mid-way is ejected as one that fails before."""
            lease.release()
            if failure is not None and failure.retryable and not isinstance(failure, StreamOverTime):
                self.balancer.failed(target.backend)
            else:  # a client that leaves, or a long answer, is no fault of the instance's
                self.balancer.succeeded(target.backend)

        return StreamSource(
            first=first,
            rest=stream,
            idle_timeout=timeouts.idle,
            deadline=waited + timeouts.total,
            on_close=closed,
        )
