"""State: where a request may go, decided before any request is sent."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import UpstreamUnavailable
from gateway.exchange import Exchange
from gateway.routes.models import model_objects
from gateway.schemas import ModelInfo
from gateway.state import State

PRIVATE = {"x-privacy": "private"}


def make_state(**overrides: Any) -> State:
    data: dict[str, Any] = {
        "backends": [
            {"name": "ollama-1", "type": "ollama", "base_url": "http://10.0.0.5:11434"},
            {"name": "ollama-2", "type": "ollama", "base_url": "http://10.0.0.6:11434"},
        ],
        "models": [
            {
                "name": "emb",
                "deployments": [
                    {"backend": "ollama-1", "model": "nomic-embed-text"},
                    {"backend": "ollama-2", "model": "nomic-embed-text"},
                ],
            }
        ],
        "routing": {"health": {"unhealthy_after": 1, "cooldown": 30}},
    }
    data.update(overrides)
    return State.build(parse_config(data, "test"), {})


class Listings:
    """Stands in for `State.listing`: what each instance has, and who was asked (None: no answer)."""

    def __init__(self, answers: dict[str, list[ModelInfo] | None]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, name: str) -> list[ModelInfo] | None:
        self.asked.append(name)
        return self.answers[name]


async def private_plan(state: State) -> list[str]:
    plans = await state.plans(
        PRIVATE, Exchange("r", "embeddings"), key=None, model="emb", metadata=None, texts=lambda: ()
    )
    return [target.backend for plan in plans for target in plan.targets]


@pytest.mark.anyio
async def test_a_private_request_does_not_wait_on_an_instance_the_balancer_ejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = make_state()
    listings = Listings({"ollama-1": [ModelInfo("nomic-embed-text:latest")], "ollama-2": None})
    monkeypatch.setattr(state, "listing", listings)
    state.balancer.failed("ollama-2")  # ejected: a hung host, found out by the health checks
    try:
        assert await private_plan(state) == ["ollama-1"]
        assert listings.asked == ["ollama-1"]
    finally:
        await state.aclose()


@pytest.mark.anyio
async def test_an_ejected_instance_is_asked_when_no_other_could_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = make_state()
    listings = Listings({"ollama-1": None, "ollama-2": [ModelInfo("nomic-embed-text:latest")]})
    monkeypatch.setattr(state, "listing", listings)
    for name in ("ollama-1", "ollama-2"):
        state.balancer.failed(name)
    try:
        assert await private_plan(state) == ["ollama-2"]  # it may be back before its cool-down ends
        assert sorted(listings.asked) == ["ollama-1", "ollama-2"]
    finally:
        await state.aclose()


@pytest.mark.anyio
async def test_another_local_backend_spares_the_wait_on_an_ejected_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = make_state(
        backends=[
            {"name": "ollama-1", "type": "ollama", "base_url": "http://10.0.0.5:11434"},
            {"name": "ollama-2", "type": "ollama", "base_url": "http://10.0.0.6:11434"},
            {"name": "vllm", "type": "openai", "base_url": "http://10.0.0.7:8000/v1", "local": True},
        ],
        models=[
            {
                "name": "emb",
                "deployments": [{"backend": "ollama-1"}, {"backend": "ollama-2"}, {"backend": "vllm"}],
            }
        ],
    )
    listings = Listings({"ollama-1": None, "ollama-2": None})
    monkeypatch.setattr(state, "listing", listings)
    state.balancer.failed("ollama-1")
    state.balancer.failed("ollama-2")
    try:
        assert await private_plan(state) == ["vllm"]
        assert listings.asked == []
    finally:
        await state.aclose()


@pytest.mark.anyio
async def test_instances_whose_inventory_is_unknown_are_no_candidates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = make_state()
    monkeypatch.setattr(state, "listing", Listings({"ollama-1": None, "ollama-2": None}))
    try:
        with pytest.raises(UpstreamUnavailable):
            await private_plan(state)
    finally:
        await state.aclose()


@pytest.mark.anyio
async def test_the_model_list_asks_only_the_backends_under_a_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    state = make_state(
        models=[
            {"name": "emb", "deployments": [{"backend": "ollama-1", "model": "nomic-embed-text"}]},
            {"name": "ollama/*", "deployments": [{"backend": "ollama-2"}]},
        ]
    )
    listings = Listings({"ollama-1": None, "ollama-2": [ModelInfo("qwen2.5:0.5b")]})
    monkeypatch.setattr(state, "listing", listings)
    try:
        assert list(await model_objects(state, None)) == ["emb", "ollama/qwen2.5:0.5b"]
        assert listings.asked == ["ollama-2"]  # a hung ollama-1 would hold up no answer
    finally:
        await state.aclose()
