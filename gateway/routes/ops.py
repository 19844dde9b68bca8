"""Operator endpoints: /healthz (process alive), /readyz (a backend answers), /metrics."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import GatewayError
from gateway.metrics import CONTENT_TYPE
from gateway.state import State, json_response

PROBE_TIMEOUT = 2.0


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: State = request.app.state.gateway

    async def probe(name: str) -> tuple[str, bool]:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await state.providers[name].probe()
        except (GatewayError, TimeoutError):
            return name, False
        return name, True

    results = dict(await asyncio.gather(*(probe(name) for name in state.providers)))
    for name, up in results.items():
        state.metrics.backend_up.labels(name).set(1 if up else 0)
    backends = {
        backend.name: {"type": backend.type, "local": backend.local, "up": results[backend.name]}
        for backend in state.config.backends
    }
    ready = any(results.values())
    return json_response(
        {"status": "ready" if ready else "unavailable", "backends": backends}, 200 if ready else 503
    )


async def metrics(request: Request) -> Response:
    state: State = request.app.state.gateway
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
