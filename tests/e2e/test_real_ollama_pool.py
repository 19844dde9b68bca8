"""One model name served by two real Ollama servers: both take work, and one going away is survived."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from gateway.config import parse_config
from tests.e2e.conftest import sample, scrape
from tests.engines import MODELS, TINY, RealOllama
from tests.servers import ServerThread

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "Say something."}]


def loaded(ollama: RealOllama) -> set[str]:
    return {m["name"] for m in httpx.get(ollama.url + "/api/ps", timeout=10).json()["models"]}


def test_two_real_servers_share_the_work_and_cover_for_each_other(
    real_ollama: RealOllama, start_gateway: Callable[..., ServerThread]
) -> None:
    second = RealOllama()  # our own, because this test stops it
    try:
        for name in MODELS:
            second.ensure_model(name)
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
                "routing": {"strategy": "round_robin"},
            },
            "test",
        )
        gateway = start_gateway(config)
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=60) as api:
            for _ in range(4):
                reply = api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=16)  # type: ignore[arg-type]
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
            assert per_backend == {"ollama-a": 2.0, "ollama-b": 2.0}
            assert TINY in loaded(real_ollama)
            assert TINY in loaded(second)

            second.stop()
            for _ in range(2):  # whichever server the rotation picks, the answer comes from ollama-a
                reply = api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8)  # type: ignore[arg-type]
                assert reply.usage is not None and reply.usage.completion_tokens == 8
        after = scrape(gateway.url)
        assert sample(after, "gateway_upstream_errors_total", backend="ollama-b", reason="connect") >= 1
        assert (
            sample(
                after,
                "gateway_requests_total",
                endpoint="chat",
                model="tiny",
                backend="ollama-a",
                status="200",
            )
            == 4.0
        )
    finally:
        second.stop()
