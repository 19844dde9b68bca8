"""Everything one running gateway owns, built once per app and passed down; no module globals."""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import privacy
from gateway.audit import AuditLog
from gateway.auth import Keys, allows, check_model
from gateway.balancer import Balancer
from gateway.config import ApiKey, Config
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError, ShuttingDown, Unavailable
from gateway.exchange import Exchange, audit_failed
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.policy import Plan, Router, Target, local_only, locality
from gateway.providers import build_provider
from gateway.providers.base import Provider
from gateway.ratelimit import ANONYMOUS, RateLimiter, estimate
from gateway.schemas import ModelInfo
from gateway.upstream import make_transport

if TYPE_CHECKING:
    from gateway.incoming import Incoming

INVENTORY_TTL = 5.0
INVENTORY_TIMEOUT = 3.0
FAILED_LISTING_TTL = 1.0  # an unreachable backend is asked again this soon


class JSONAnswer(Response):
    """A JSON body with its headers, sent as they are: Starlette's Response without the header
    normalisation its constructor does, which showed in the profile of every answer. `after`
    runs once the answer has been handed to the server, or has failed to be: the request's
    bookkeeping, which the client need not wait for."""

    media_type = "application/json"

    def __init__(
        self, content: bytes, status: int, headers: Mapping[str, str], after: Callable[[], None] | None = None
    ) -> None:
        self.status_code = status
        self.body = content
        self.after = after
        self.raw_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
        self.raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        try:
            await send(start)
            await send({"type": "http.response.body", "body": self.body})
        finally:
            if self.after is not None:
                self.after()


def state_of(app: Any) -> State:
    """The State in force for the Starlette `app` (a reload swaps it). Kept as a plain attribute of
    the app rather than on `app.state`, where every read goes through Starlette's `__getattr__`
    after a failed lookup and its AttributeError: about 7,000 instructions a read, on every
    request of the hot routes (bench/README.md)."""
    state: State = app.gateway_state
    return state


def install(app: Any, state: State) -> None:
    """Put `state` in force for `app`: the requests that start from now on get it."""
    app.gateway_state = state


def json_response(
    body: Any,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    after: Callable[[], None] | None = None,
) -> Response:
    return JSONAnswer(orjson.dumps(body), status, headers or {}, after)


@dataclass
class State:
    config: Config
    metrics: Metrics
    transport: httpx.AsyncBaseTransport  # the connection pool every provider shares
    providers: dict[str, Provider]
    router: Router
    balancer: Balancer
    dispatcher: Dispatcher
    keys: Keys
    limiter: RateLimiter
    audit: AuditLog | None = None
    log: Any = field(default_factory=get_logger)
    active: int = 0  # requests begun and not yet finished
    # backend -> (fetched at, its models or None when unreachable), and the fetches under way
    _listings: dict[str, tuple[float, list[ModelInfo] | None]] = field(default_factory=dict)
    _fetching: dict[str, asyncio.Task[list[ModelInfo] | None]] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config, environ: Mapping[str, str] | None = None) -> State:
        metrics = Metrics()
        return cls._assemble(
            config,
            environ,
            metrics=metrics,
            transport=make_transport(),
            balancer=Balancer(config, metrics),
            limiter=RateLimiter.build(config.rate_limits, get_logger()),
            audit=None,
        )

    def successor(self, config: Config, environ: Mapping[str, str] | None = None) -> State:
        """The State for a reloaded config. It shares what outlives a config (metrics, the
        connection pool, the balancer with its leases and health, the audit file when its path
        is unchanged), so requests in flight on this one finish undisturbed. Raises ConfigError,
        with nothing changed, when the new config cannot be used."""
        audit = self.audit if config.privacy.audit_log == self.config.privacy.audit_log else None
        limiter = (
            RateLimiter(config.rate_limits, self.limiter.store)
            if self.limiter.shares_store(config.rate_limits)
            else RateLimiter.build(config.rate_limits, self.log)
        )
        successor = State._assemble(
            config,
            environ,
            metrics=self.metrics,
            transport=self.transport,
            balancer=self.balancer,
            limiter=limiter,
            audit=audit,
        )
        self.balancer.reconfigure(config)
        return successor

    @classmethod
    def _assemble(
        cls,
        config: Config,
        environ: Mapping[str, str] | None,
        *,
        metrics: Metrics,
        transport: httpx.AsyncBaseTransport,
        balancer: Balancer,
        limiter: RateLimiter,
        audit: AuditLog | None,
    ) -> State:
        environ = os.environ if environ is None else environ
        privacy.require_working_detector(config.privacy)  # first: these two are what can fail
        keys = Keys(config.auth, environ)
        providers = {b.name: build_provider(b, transport, environ, config.images) for b in config.backends}
        if audit is None and config.privacy.audit_log:
            audit = AuditLog(
                config.privacy.audit_log, on_failure=partial(audit_failed, metrics, get_logger())
            )
        metrics.register_backends([backend.name for backend in config.backends])
        dispatcher = Dispatcher(providers, balancer, metrics, config.routing.retries)
        return cls(
            config, metrics, transport, providers, Router(config), balancer, dispatcher, keys, limiter, audit
        )

    async def retire(self, successor: State, deadline: float) -> int:
        """After a reload: wait up to `deadline` seconds for this State's requests to finish, then
        close what the successor does not share. Returns how many were still running."""
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline
        while self.active and loop.time() < until:
            await asyncio.sleep(0.05)
        if self.audit is not None and self.audit is not successor.audit:
            await self.audit.aclose()
        if self.limiter.store is not successor.limiter.store:
            await self.limiter.aclose()
        return self.active

    async def aclose(self) -> None:
        await self.limiter.aclose()
        await self.transport.aclose()
        if self.audit is not None:
            await self.audit.aclose()

    # ---- one request ----

    def begin(self, request_id: str, endpoint: str) -> Exchange:
        self.active += 1
        return Exchange(request_id=request_id, endpoint=endpoint)

    def finish(self, exchange: Exchange, status: int) -> None:
        if not exchange.finished:
            self.active -= 1
            if exchange.local and (provider := self.dispatcher.providers.get(exchange.backend)) is not None:
                # an Ollama cloud model is found out by its answer (a reload may have removed it since)
                exchange.local = not provider.forwards(exchange.served_model)
            exchange.finish(status, self.metrics, self.log, self.audit)
            if (reservation := exchange.reservation) is not None:
                usage = exchange.usage
                # Without a count from the backend (a stream cut or broken before it came, a backend
                # that counts nothing), a request that reached one keeps its estimate, or more when
                # the prompt's and the output relayed come to more.
                if usage is not None:
                    used = usage.prompt_tokens + usage.completion_tokens
                elif exchange.reached:
                    used = max(reservation.cost, exchange.prompt_estimate + exchange.relayed)
                else:
                    used = 0
                self.limiter.settle(reservation, used)

    def authenticate(self, headers: Mapping[str, str], exchange: Exchange) -> ApiKey | None:
        """The request's key. The privacy its key or header states is noted already, so that a
        request refused before its privacy is decided is not answered and audited as public."""
        tag = headers.get(self.config.privacy.header)
        if tag is not None and privacy.states_private(tag):
            exchange.privacy, exchange.privacy_reason = "private", "header"
        key = self.keys.identify(headers.get("authorization"))
        if key is not None:
            exchange.key_name = key.name
            if key.privacy == "private" and exchange.privacy != "private":
                exchange.privacy, exchange.privacy_reason = "private", "key"
        return key

    async def plans(
        self,
        headers: Mapping[str, str],
        exchange: Exchange,
        *,
        key: ApiKey | None,
        model: str,
        metadata: Mapping[str, Any] | None,
        texts: Callable[[], Iterable[str]],
        attachments: Callable[[], bool] | None = None,
        token_ids: Callable[[], bool] | None = None,
    ) -> list[Plan]:
        """Where a request may go, in order: route it, check the key, decide its privacy, and for a
        private request keep only local targets (or, for chat, `privacy.local_model`'s), never a
        fallback; a public one's fallbacks are those the key may use."""
        exchange.requested_model = model
        plan = self.router.plan(model, visible=partial(allows, key))
        exchange.model_label = plan.label
        check_model(key, model)
        decision = privacy.classify(
            self.config.privacy,
            headers,
            metadata=metadata,
            key=key,
            model_policy=plan.privacy,
            texts=texts,
            attachments=attachments,
            token_ids=token_ids,
        )
        exchange.privacy, exchange.privacy_reason = decision.label, decision.reason
        self.metrics.child(self.metrics.privacy, decision.label, decision.reason).inc()
        if not decision.private:
            plans = [plan]
            for name in plan.fallbacks:
                if not allows(key, name):  # a key is served only the models its globs take
                    continue
                fallback = self.router.plan(name)
                if fallback.privacy != "private":
                    plans.append(fallback)
                elif (local := await self._local_fallback(fallback)) is not None:
                    plans.append(local)
            return plans
        local = await self._local_plan(plan)
        # A chat model (text completions are served as chat): it would answer an embedding request
        # with an error, or with vectors of another model, size and space.
        chat = exchange.endpoint != "embeddings"
        substitute = self.config.privacy.local_model if chat else None
        if local is None and substitute is not None and substitute != plan.route:
            local = await self._local_plan(self.router.plan(substitute))
            if local is not None:
                exchange.notes["privacy_substitute"] = substitute
        if local is None:
            raise privacy.refusal(model, decision, chat=chat, substitute=substitute)
        return [local]

    async def admit(
        self, exchange: Exchange, key: ApiKey | None, texts: Iterable[str], extra_tokens: int | None
    ) -> None:
        """Charge the request to its key's rate limits (429 when they are spent): its text's
        estimated tokens plus `extra_tokens` (max_tokens, or pre-tokenized input)."""
        limits = self.limiter.limits(key.limits if key is not None else None)
        if limits is not None:
            name = key.name if key is not None else ANONYMOUS
            exchange.prompt_estimate = estimate(list(texts), 0) if limits.tpm else 0
            cost = exchange.prompt_estimate + (extra_tokens or 0)
            exchange.reservation = await self.limiter.admit(name, limits, cost)

    async def _local_fallback(self, plan: Plan) -> Plan | None:
        """A model whose own policy is private, as a public request's fallback: it keeps its
        promise and lends only its local deployments (None when none can serve now)."""
        try:
            return await self._local_plan(plan)
        except GatewayError:
            return None

    async def _local_plan(self, plan: Plan) -> Plan | None:
        local = {t.backend for t in plan.targets if self.config.backend(t.backend).local}
        ollamas = {name for name in local if self.config.backend(name).type == "ollama"}
        # An instance the balancer has ejected is not asked what it has while another local one
        # may serve: on a hung host the question costs INVENTORY_TIMEOUT, for every private
        # request. Unasked, its locality is unknown, so it is no candidate (fail closed).
        usable = {name for name in local if self.balancer.usable(name)}
        if usable:
            ollamas &= usable
        listings = dict(zip(ollamas, await asyncio.gather(*map(self.listing, ollamas)), strict=True))
        verdicts: dict[Target, str] = {
            t: locality(self.config.backend(t.backend), t.model, listings.get(t.backend))
            for t in plan.targets
        }
        return local_only(plan, verdicts)

    def headers(self, exchange: Exchange) -> dict[str, str]:
        """Every answer's own headers: its request id, privacy decision, backend, rate limits."""
        headers = {"x-request-id": exchange.request_id,
                   "x-phoenix-privacy": exchange.privacy if exchange.privacy == "public"
                   else f"{exchange.privacy};reason={exchange.privacy_reason}"}  # fmt: skip
        if exchange.backend:
            headers["x-phoenix-backend"] = exchange.backend
        if exchange.reservation is not None:
            headers.update(exchange.reservation.headers)
        return headers

    def fail(self, exchange: Exchange, error: GatewayError, *, unread: bool = False) -> Response:
        """The error answer, recorded. `unread`: the request's body has not all come in (refused
        for its size, its type or its key first); the connection then closes after the answer,
        rather than reading through the rest, or taking its bytes for the next request."""
        self.record_failure(exchange, error)
        headers = {**self.headers(exchange), **error.headers}
        if unread:
            headers["connection"] = "close"
        return json_response(error.body(), error.http_status, headers)

    def record_failure(self, exchange: Exchange, error: GatewayError) -> None:
        """A failed request's log line, metrics and record; the answer is the caller's."""
        exchange.error_type = error.type
        log = getattr(self.log, error.log_level)
        log("request failed", error=error.type, status=error.http_status, message=error.log_message)
        self.finish(exchange, error.http_status)

    def cancelled(self, exchange: Exchange, request: Incoming) -> Response:
        """The request's task was cancelled before its answer began: by its body's timeout or its
        client leaving (gateway/sweep.py), else by the server at its shutdown deadline (503 while
        the connection is still there). Answer, and record it."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        error = request.why_cancelled() or ShuttingDown()
        return self.fail(exchange, error, unread=not request.body_read)

    def unexpected(self, error: BaseException) -> None:
        """Our own bug: log where it happened (not the message, which may hold request text)."""
        frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
        where = f"{frame.filename}:{frame.lineno}" if frame else "?"
        self.log.error("internal error", error=type(error).__name__, where=where)

    def crash(self, exchange: Exchange, error: BaseException) -> Response:
        self.unexpected(error)
        return self.fail(
            exchange, GatewayError(f"Internal error in the gateway (request {exchange.request_id}).")
        )

    # ---- what backends serve ----

    async def listing(self, name: str) -> list[ModelInfo] | None:
        """One backend's models, cached briefly; None when it could not be asked. Concurrent callers
        share one fetch."""
        cached = self._listings.get(name)
        if cached is not None:
            fetched_at, models = cached
            ttl = INVENTORY_TTL if models is not None else FAILED_LISTING_TTL
            if time.monotonic() - fetched_at < ttl:
                return models
        task = self._fetching.get(name)
        if task is None:
            task = asyncio.ensure_future(self._fetch_listing(name))
            self._fetching[name] = task
            task.add_done_callback(lambda _: self._fetching.pop(name, None))
        return await asyncio.shield(task)

    async def _fetch_listing(self, name: str) -> list[ModelInfo] | None:
        models: list[ModelInfo] | None
        try:
            async with asyncio.timeout(INVENTORY_TIMEOUT):
                models = await self.providers[name].list_models()
        except (GatewayError, TimeoutError) as error:
            self.log.warning("model listing failed", backend=name, error=type(error).__name__)
            models = None
        self._listings[name] = (time.monotonic(), models)
        self.router.learn(name, (info.id for info in models or ()))  # clients use both llama3.2 forms
        return models

    async def refresh(self) -> None:
        """One round of the background work: probe every backend (health), and re-read what each
        Ollama instance has and has loaded (placement)."""

        async def one(name: str, provider: Provider) -> None:
            try:
                async with asyncio.timeout(INVENTORY_TIMEOUT):
                    await provider.probe()
            except Unavailable:  # the gateway's own trouble (out of descriptors): no word on the backend
                return
            except (GatewayError, TimeoutError):
                self.balancer.probed(name, ok=False)
                return
            self.balancer.probed(name, ok=True)
            if provider.backend.type != "ollama":
                return
            models = await self._fetch_listing(name)
            try:
                async with asyncio.timeout(INVENTORY_TIMEOUT):
                    loaded = await provider.loaded_models()
            except (GatewayError, TimeoutError):
                loaded = None
            available = None if models is None else [info.id for info in models]
            self.balancer.set_models(name, available, loaded)

        await asyncio.gather(*(one(name, provider) for name, provider in self.providers.items()))

    async def keep_fresh(self) -> None:
        """The background loop, every `routing.health.interval` seconds until cancelled."""
        while True:
            try:
                await self.refresh()
            except Exception as error:  # never let the loop die; our own bug is logged
                self.unexpected(error)
            await asyncio.sleep(self.config.routing.health.interval)

    async def inventory(self, backends: Iterable[str] | None = None) -> dict[str, list[ModelInfo]]:
        """The model list of each of `backends` (default: every one), fetched concurrently; a down
        backend lists nothing."""
        names = list(self.providers if backends is None else backends)
        listings = await asyncio.gather(*map(self.listing, names))
        return {name: models or [] for name, models in zip(names, listings, strict=True)}
