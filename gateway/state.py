"""Everything one running gateway owns, built once per app and passed down; no module globals."""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.balancer import Balancer
from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.policy import Router
from gateway.providers import build_provider
from gateway.providers.base import Provider
from gateway.schemas import ModelInfo
from gateway.upstream import make_client

INVENTORY_TTL = 5.0
INVENTORY_TIMEOUT = 3.0


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=dict(headers or {}), media_type="application/json")


@dataclass
class State:
    config: Config
    metrics: Metrics
    client: httpx.AsyncClient
    providers: dict[str, Provider]
    router: Router
    balancer: Balancer
    dispatcher: Dispatcher
    log: Any = field(default_factory=get_logger)
    _inventory: dict[str, list[ModelInfo]] = field(default_factory=dict)
    _inventory_at: float = -INVENTORY_TTL

    @classmethod
    def build(cls, config: Config, environ: Mapping[str, str] | None = None) -> State:
        environ = os.environ if environ is None else environ
        metrics = Metrics()
        names = [backend.name for backend in config.backends]
        metrics.register_backends(names)
        client = make_client()
        providers = {backend.name: build_provider(backend, client, environ) for backend in config.backends}
        balancer = Balancer(config.routing, {b.name: b.weight for b in config.backends}, metrics)
        dispatcher = Dispatcher(providers, balancer, metrics, config.routing.retries)
        return cls(config, metrics, client, providers, Router(config), balancer, dispatcher)

    async def aclose(self) -> None:
        await self.client.aclose()

    # ---- one request ----

    def begin(self, request: Request, endpoint: str) -> Exchange:
        return Exchange(request_id=request.state.request_id, endpoint=endpoint)

    def finish(self, exchange: Exchange, status: int) -> None:
        exchange.finish(status, self.metrics, self.log)

    def headers(self, exchange: Exchange) -> dict[str, str]:
        headers = {"x-phoenix-privacy": exchange.privacy if exchange.privacy == "public"
                   else f"{exchange.privacy};reason={exchange.privacy_reason}"}  # fmt: skip
        if exchange.backend:
            headers["x-phoenix-backend"] = exchange.backend
        return headers

    def fail(self, exchange: Exchange, error: GatewayError) -> Response:
        exchange.error_type = error.error_type
        log = getattr(self.log, error.log_level)
        log("request failed", error=error.error_type, status=error.http_status, message=error.message)
        self.finish(exchange, error.http_status)
        return json_response(error.body(), error.http_status, {**self.headers(exchange), **error.headers})

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

    async def inventory(self) -> dict[str, list[ModelInfo]]:
        """Each backend's model list, fetched concurrently, cached briefly; a down backend lists nothing."""
        if time.monotonic() - self._inventory_at < INVENTORY_TTL:
            return self._inventory

        async def listing(name: str, provider: Provider) -> tuple[str, list[ModelInfo]]:
            try:
                async with asyncio.timeout(INVENTORY_TIMEOUT):
                    return name, await provider.list_models()
            except (GatewayError, TimeoutError) as error:
                self.log.warning("model listing failed", backend=name, error=type(error).__name__)
                return name, []

        results = await asyncio.gather(*(listing(n, p) for n, p in self.providers.items()))
        self._inventory = dict(results)
        self._inventory_at = time.monotonic()
        for models in self._inventory.values():
            for info in models:
                self.router.known.add(info.id)
                # Ollama's `llama3.2` is `llama3.2:latest`; clients use both.
                self.router.known.add(info.id.removesuffix(":latest"))
        return self._inventory
