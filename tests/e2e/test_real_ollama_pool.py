"""One model name served by two real Ollama servers: the one that has the model in memory (by the
real `/api/ps`) is preferred, and when it goes away the other serves."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.config import parse_config
from tests.e2e.conftest import sample, scrape
from tests.engines import MODELS, TINY, RealOllama
from tests.servers import ServerThread

pytestmark = pytest.mark.e2e
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]


def loaded(ollama: RealOllama) -> set[str]:
    return {m["name"] for m in httpx.get(ollama.url + "/api/ps", timeout=10).json()["models"]}


def test_the_warm_server_is_preferred_and_the_other_covers_when_it_dies(
    real_ollama: RealOllama, start_gateway: Callable[..., ServerThread]
) -> None:
    second = RealOllama()  # our own, because this test stops it
    try:
        for name in MODELS:
            second.ensure_model(name)
        # The model is in memory on the second server only (the first may hold it from other tests).
        httpx.post(real_ollama.url + "/api/generate", json={"model": TINY, "keep_alive": 0}, timeout=30)
        httpx.post(
            second.url + "/api/generate",
            json={"model": TINY, "prompt": "hi", "options": {"num_predict": 1}},
            timeout=60,
        )
        assert TINY not in loaded(real_ollama) and TINY in loaded(second)
        config = parse_config(
            {
                "backends": [
                    {"name": "ollama-a", "type": "ollama", "base_url": real_ollama.url},
                    {"name": "ollama-b", "type": "ollama", "base_url": second.url},
                ],
                "models": [
                    {
                        "name": "tiny",
                        "deployments": [
                            {"backend": "ollama-a", "model": TINY},
                            {"backend": "ollama-b", "model": TINY},
                        ],
                    }
                ],
                "routing": {"strategy": "round_robin", "health": {"interval": 0.2}},
            },
            "test",
        )
        gateway = start_gateway(config)
        time.sleep(0.5)  # the background refresh reads both /api/ps
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=60) as api:
            for _ in range(4):
                reply = api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=16)
                assert reply.usage is not None and reply.usage.completion_tokens == 16
            served = scrape(gateway.url)
            per_backend = {
                backend: sample(
                    served,
                    "gateway_requests_total",
                    endpoint="chat",
                    model="tiny",
                    backend=backend,
                    status="200",
                )
                for backend in ("ollama-a", "ollama-b")
            }
            assert per_backend == {"ollama-a": 0.0, "ollama-b": 4.0}  # round robin, but no cold load
            assert TINY not in loaded(real_ollama)

            second.stop()
            for _ in range(2):
                reply = api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8)
                assert reply.usage is not None and reply.usage.completion_tokens == 8
        after = scrape(gateway.url)
        assert (
            sample(
                after,
                "gateway_requests_total",
                endpoint="chat",
                model="tiny",
                backend="ollama-a",
                status="200",
            )
            == 2.0
        )
    finally:
        second.stop()
