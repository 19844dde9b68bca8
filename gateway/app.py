"""create_app(config) -> the ASGI app: the route table, middleware, and a lifespan that owns the State."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.config import Config
from gateway.middleware import RequestId
from gateway.routes.chat import chat_completions
from gateway.routes.embeddings import embeddings
from gateway.routes.models import get_model, list_models
from gateway.routes.ops import healthz, metrics, readyz
from gateway.state import State, json_response

ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
    message = {
        404: f"Unknown endpoint {request.method} {request.url.path}.",
        405: f"Method {request.method} is not allowed on {request.url.path}.",
    }.get(exc.status_code, str(exc.detail))
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": kind}}
    return json_response(body, exc.status_code, exc.headers)


def create_app(config: Config, environ: Mapping[str, str] | None = None) -> Starlette:
    state = State.build(config, environ)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        refresher = asyncio.create_task(state.keep_fresh())
        try:
            yield
        finally:
            refresher.cancel()
            await state.aclose()

    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(RequestId)],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.gateway = state
    return app
