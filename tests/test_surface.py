"""The public surface, pinned: the route table and the metric names operators build dashboards on."""

from __future__ import annotations

from gateway.app import ROUTES
from gateway.metrics import Metrics


def test_route_table() -> None:
    assert [(route.path, sorted(route.methods or ())) for route in ROUTES] == [
        ("/v1/chat/completions", ["POST"]),
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
    }
    for attribute, names in labels.items():
        assert getattr(metrics, attribute)._labelnames == names, attribute
