"""The public surface, pinned: the route table and the metric names operators build dashboards on."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import HOT_ROUTES, ROUTES, create_app
from gateway.metrics import Metrics
from gateway.state import State, install
from tests.e2e.conftest import ollama_config


def test_route_table() -> None:
    assert [(route.path, sorted(route.methods or ())) for route in ROUTES] == [
        ("/v1/chat/completions", ["POST"]),
        ("/v1/completions", ["POST"]),
        ("/v1/embeddings", ["POST"]),
        ("/v1/models", ["GET", "HEAD"]),
        ("/v1/models/{model_id:path}", ["GET", "HEAD"]),
        ("/healthz", ["GET", "HEAD"]),
        ("/readyz", ["GET", "HEAD"]),
        ("/metrics", ["GET", "HEAD"]),
        ("/openapi.json", ["GET", "HEAD"]),
    ]


def test_metric_names_and_labels() -> None:
    metrics = Metrics()
    families = {family.name: family for family in metrics.registry.collect()}
    assert set(families) == {
        "gateway_requests",
        "gateway_request_duration_seconds",
        "gateway_time_to_first_token_seconds",
        "gateway_time_per_output_token_seconds",
        "gateway_tokens",
        "gateway_inflight_requests",
        "gateway_backend_up",
        "gateway_upstream_errors",
        "gateway_retries",
        "gateway_fallbacks",
        "gateway_privacy_decisions",
        "gateway_overhead_seconds",
        "gateway_audit_write_failures",
        "gateway_key_requests",
        "gateway_key_tokens",
    }
    labels = {
        "requests": ("endpoint", "model", "backend", "status"),
        "duration": ("endpoint", "model", "backend", "stream"),
        "ttft": ("model", "backend"),
        "tpot": ("model", "backend"),
        "tokens": ("model", "backend", "type"),
        "inflight": ("backend",),
        "backend_up": ("backend",),
        "upstream_errors": ("backend", "reason"),
        "retries": ("backend",),
        "fallbacks": ("from_model", "to_model"),
        "privacy": ("privacy", "reason"),
        "overhead": ("endpoint",),
        "audit_failures": (),
        "key_requests": ("key", "status"),
        "key_tokens": ("key", "type"),
    }
    for attribute, names in labels.items():
        assert getattr(metrics, attribute)._labelnames == names, attribute


JSON = {"content-type": "application/json"}


@pytest.mark.anyio
@pytest.mark.parametrize("path", list(HOT_ROUTES))
async def test_the_route_tables_traffic_endpoints_serve_as_the_hot_path_does(path: str) -> None:
    """The Starlette route table's endpoints for the two traffic routes (HotRoutes calls the
    handlers directly) answer too: a refused body, in the same shape."""
    config = ollama_config("http://127.0.0.1:1")
    starlette = Starlette(routes=ROUTES)
    install(starlette, State.build(config, {}))
    results = []
    for app in (starlette, create_app(config, environ={})):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            answer = await client.post(
                path, content=b"{not json", headers={"content-type": "application/json"}
            )
        results.append((answer.status_code, answer.json()["error"]["message"]))
    assert results[0] == results[1] == (400, "The request body is not valid JSON.")
