"""The fakes the other tests run against, held to what the real engines answer: the same request
sent to the real Ollama 0.5.4 and to FakeOllama gets the same status and the same body (errors),
or the same shape (answers). Where the fake deliberately models a newer Ollama (contracts/ollama.md)
the case is left out and the difference said in the fake."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.engines import TINY, RealOllama
from tests.fakes.ollama_server import FakeOllama
from tests.servers import ServerThread, serve

pytestmark = pytest.mark.e2e
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[ServerThread]:
    with serve(FakeOllama(models=[TINY]).app) as server:
        yield server


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": HI, "stream": False, "options": {"num_predict": 2}, **fields}


ERRORS: list[tuple[str, str, Any]] = [
    ("unknown model", "/api/chat", chat(model="nope")),
    ("no model", "/api/chat", {"messages": HI}),
    ("no body", "/api/chat", None),
    (
        "arguments as a string",
        "/api/chat",
        chat(
            messages=[
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                }
            ]
        ),
    ),
    (
        "a data URL for an image",
        "/api/chat",
        chat(messages=[{**HI[0], "images": ["data:image/png;base64,AA"]}]),
    ),
    ("stop as a string", "/api/chat", chat(options={"stop": "x"})),
    ("stop of numbers", "/api/chat", chat(options={"stop": [1]})),
    ("num_predict as a string", "/api/chat", chat(options={"num_predict": "x"})),
    ("temperature as a string", "/api/chat", chat(options={"temperature": "hot"})),
    ("use_mmap as a string", "/api/chat", chat(options={"use_mmap": "x"})),
    ("format yaml", "/api/chat", chat(format="yaml")),
    ("a schema of an unknown type", "/api/chat", chat(format={"properties": {"a": {"type": "frobnicate"}}})),
    ("a schema's $ref to nothing", "/api/chat", chat(format={"properties": {"a": {"$ref": "#/$defs/x"}}})),
    ("keep_alive not a duration", "/api/chat", chat(keep_alive="bogus")),
    ("keep_alive without a unit", "/api/chat", chat(keep_alive="5")),
    ("keep_alive of an unknown unit", "/api/chat", chat(keep_alive="5x")),
    ("keep_alive a boolean", "/api/chat", chat(keep_alive=True)),
    ("show an unknown model", "/api/show", {"model": "nope"}),
    ("embed with an unknown model", "/api/embed", {"model": "nope", "input": "x"}),
]


@pytest.mark.parametrize(("path", "body"), [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_the_fake_ollama_refuses_as_the_real_one_does(
    real_ollama: RealOllama, fake: ServerThread, path: str, body: Any
) -> None:
    content = b"" if body is None else orjson.dumps(body)
    real = httpx.post(real_ollama.url + path, content=content, timeout=60)
    faked = httpx.post(fake.url + path, content=content, timeout=10)
    assert real.status_code >= 400, "precondition: the real server refuses it"
    assert (faked.status_code, faked.json()) == (real.status_code, real.json())


@pytest.mark.parametrize("stream", [False, True], ids=["json", "ndjson"])
def test_the_fake_ollamas_answers_have_the_real_ones_shape(
    real_ollama: RealOllama, fake: ServerThread, stream: bool
) -> None:
    body = chat(stream=stream, keep_alive="5m", options={"num_predict": 3, "temperature": 0.8})
    answers = [httpx.post(url + "/api/chat", json=body, timeout=60) for url in (real_ollama.url, fake.url)]
    shapes = []
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith(
            "application/x-ndjson" if stream else "application/json"
        )
        assert answer.text.endswith("\n") if stream else True
        lines = [orjson.loads(line) for line in answer.text.splitlines()]
        assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"] is True
        last = lines[-1]
        # durations are left out when zero (omitempty), as the real ones often are at this speed
        fields = {key for key in last if not key.endswith("_duration")}
        shapes.append((fields, {*last["message"]}, last["message"]["role"]))
    assert shapes[0] == shapes[1]
