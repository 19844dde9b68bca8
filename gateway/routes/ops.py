"""Operator endpoints: /healthz (process alive), /readyz (a backend answers), /metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.metrics import CONTENT_TYPE
from gateway.state import json_response, state_of


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when at least one backend answered its latest probe and is not ejected (see
    `balancer`). It reads what the background probes found, every `routing.health.interval`
    seconds (the first at start): no backend is asked here, and none is up before its first probe
    has answered."""
    state = state_of(request.app)
    backends = {
        backend.name: {
            "type": backend.type,
            "local": backend.local,
            "up": state.balancer.up(backend.name),
        }
        for backend in state.config.backends
    }
    ready = any(entry["up"] for entry in backends.values())
    return json_response(
        {"status": "ready" if ready else "unavailable", "backends": backends}, 200 if ready else 503
    )


async def metrics(request: Request) -> Response:
    state = state_of(request.app)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
