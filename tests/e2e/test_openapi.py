"""/openapi.json: a valid OpenAPI document for exactly the routes the app serves, which the gateway
keeps to. schemathesis generates requests from the document against the gateway under uvicorn with
a fake Ollama behind it and checks every answer against the document."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis import GenerationMode, checks
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err, Ok

from gateway.app import ROUTES
from gateway.config import Config
from gateway.openapi import document
from tests.e2e.conftest import ollama_config
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.servers import ServerThread

pytestmark = pytest.mark.e2e

FakeServer = tuple[FakeOllama, ServerThread]
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
SEED = 20261129  # fixed: the same cases every run
KEYED = {"auth": {"keys": [{"name": "team", "key_sha256": "0" * 64}]}}


def test_document_is_valid_openapi() -> None:
    open_doc = document(ollama_config("http://127.0.0.1:1"))
    keyed_doc = document(ollama_config("http://127.0.0.1:1", **KEYED))
    for doc in (open_doc, keyed_doc):
        validate(doc)
        assert doc["openapi"] == "3.1.0"
        assert doc["info"]["version"]
    assert "securitySchemes" not in open_doc["components"]
    assert keyed_doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    chat = keyed_doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearerAuth": []}]
    assert set(chat["responses"]) == {
        "200",
        "400",
        "401",
        "403",
        "404",
        "408",
        "413",
        "415",
        "429",
        "502",
        "503",
        "504",
    }
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    text = keyed_doc["paths"]["/v1/completions"]["post"]
    assert (text["security"], set(text["responses"])) == (chat["security"], set(chat["responses"]))
    assert set(text["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert keyed_doc["paths"]["/healthz"]["get"]["security"] == []
    for request in ("ChatRequest", "CompletionRequest", "EmbeddingRequest"):
        model = open_doc["components"]["schemas"][request]["properties"]["model"]
        assert model["examples"] == ["llama3.2", "default", "embed"] and "enum" not in model


def test_every_route_is_documented_and_nothing_else() -> None:
    routed = {
        (re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path), method.lower())
        for route in ROUTES
        for method in route.methods or ()
        if method != "HEAD"
    }
    paths = document(ollama_config("http://127.0.0.1:1"))["paths"]
    assert routed == {(path, method) for path, item in paths.items() for method in item}


def test_the_gateway_serves_its_document(
    fake_ollama: FakeServer, start_gateway: Callable[[Config], ServerThread]
) -> None:
    config = ollama_config(fake_ollama[1].url)
    gateway = start_gateway(config)
    response = httpx.get(gateway.url + "/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == document(config)


def _served(strategy: st.SearchStrategy[Any], names: list[str]) -> st.SearchStrategy[Any]:
    """Generated model names are almost never ones the gateway knows (404), optional fields such as
    `stream` are seldom generated, and most generated conversations hold something Ollama cannot take
    (an image by URL, n > 1): put in a model it serves, stream half the chats and text completions,
    and give half of those a plain conversation or prompt, so that completions and streams are
    checked too, not only errors."""

    def edit(drawn: tuple[Any, str, int, bool, bool]) -> Any:
        case, name, stream, include_usage, plain = drawn
        if isinstance(case.body, dict):
            case.body["model"] = name
            if ("messages" in case.body or "prompt" in case.body) and stream:
                case.body["stream"] = stream == 1
                case.body["stream_options"] = {"include_usage": include_usage}
                if plain and "messages" in case.body:
                    case.body["messages"] = [{"role": "user", "content": "Hi"}]
                    case.body.pop("n", None)
                elif plain:  # a text completion: one prompt or two, as the client may send them
                    case.body["prompt"] = "Hi" if stream == 1 else ["Hi", "Bye"]
                    for field in ("n", "best_of", "suffix"):
                        case.body.pop(field, None)
        return case

    choices = st.sampled_from([0, 1, 1, 2])
    draws = st.tuples(strategy, st.sampled_from(names), choices, st.booleans(), st.booleans())
    return draws.map(edit)


def test_schemathesis_finds_nothing(
    fake_ollama: FakeServer, start_gateway: Callable[..., ServerThread]
) -> None:
    fake, server = fake_ollama
    fake.default = Reply(pieces=["Hello", " there."], prompt_eval_count=5)
    config = ollama_config(server.url)
    gateway = start_gateway(config)
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    names = ["llama3.2", "default", "embed", "ollama/qwen2.5:0.5b", "ollama/nomic-embed-text"]
    failures: dict[str, str] = {}
    results = list(schema.get_all_operations())
    assert [result.err() for result in results if isinstance(result, Err)] == []
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    # Loaded from a URL, schemathesis leaves out the operation that serves the document itself.
    assert {op.label for op in operations} == {
        f"{method.upper()} {path}" for path, item in document(config)["paths"].items() for method in item
    } - {"GET /openapi.json"}
    for operation in operations:
        post = operation.method.upper() == "POST"
        runs = [
            ("positive", GenerationMode.POSITIVE, False, 20),
            ("negative", GenerationMode.NEGATIVE, False, 15),
        ]
        if post:
            runs.append(("positive, served model", GenerationMode.POSITIVE, True, 50))
        for label, mode, served, examples in runs:
            strategy = operation.as_strategy(generation_mode=mode)
            if served:
                strategy = _served(strategy, names)

            @seed(SEED)
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def run(case: Any) -> None:
                case.call_and_validate(base_url=gateway.url, checks=CHECKS, timeout=10)

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to get wrong: no parameters, no body
            except (FailureGroup, AssertionError) as error:
                failures[f"{label}: {operation.label}"] = str(error)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
