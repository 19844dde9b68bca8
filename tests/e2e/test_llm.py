"""The provider guide's library API against a fake Ollama over real HTTP."""

from __future__ import annotations

import anyio
import pytest

from gateway.config import OllamaBackend, Timeouts
from gateway.llm import LLMError, LLMMessage, LLMProvider, LLMProviderFactory, LLMRole
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, free_port, serve

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

FakeServer = tuple[FakeOllama, ServerThread]


async def test_create_from_env_generate_reports_content_model_and_usage(fake_ollama: FakeServer) -> None:
    fake, server = fake_ollama
    fake.queue(Reply(content="Paris.", prompt_eval_count=8, eval_count=2))
    env = {"OLLAMA_BASE_URL": server.url, "OLLAMA_MODEL": "llama3.2"}
    async with LLMProviderFactory.create_from_env("ollama", env) as llm:
        reply = await llm.generate(
            [LLMMessage(LLMRole.SYSTEM, "Be brief."), LLMMessage(LLMRole.USER, "Capital of France?")],
            temperature=0.1,
            max_tokens=16,
        )
    assert (reply.content, reply.model, reply.finish_reason) == ("Paris.", "llama3.2", "stop")
    assert reply.usage["total_tokens"] == 10
    sent = fake.chat_bodies()[-1]
    assert sent["options"] == {"temperature": 0.1, "num_predict": 16}
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]


async def test_create_with_settings_streams_text(fake_ollama: FakeServer) -> None:
    fake, server = fake_ollama
    fake.queue(Reply(pieces=["Once ", "upon ", "a time"]))
    config = {"base_url": server.url, "model": "qwen2.5:0.5b", "temperature": 0.7, "timeout": 30}
    async with LLMProviderFactory.create("ollama", config) as llm:
        pieces = [text async for text in llm.generate_stream([LLMMessage(LLMRole.USER, "Story")])]
    assert pieces == ["Once ", "upon ", "a time"]
    sent = fake.chat_bodies()[-1]
    assert (sent["model"], sent["stream"], sent["options"]["temperature"]) == ("qwen2.5:0.5b", True, 0.7)


async def test_model_listing_and_availability(fake_ollama: FakeServer) -> None:
    _, server = fake_ollama
    async with LLMProviderFactory.create("ollama", {"base_url": server.url, "model": "llama3.2"}) as llm:
        assert "qwen2.5:0.5b" in await llm.list_available_models()
        assert await llm.is_model_available() is True
        assert await llm.is_model_available("mistral") is False


async def test_connection_failure_is_a_value_error_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with LLMProviderFactory.create("ollama", {"base_url": url}) as llm:
        with pytest.raises(ValueError, match=f"Cannot connect to Ollama server at {url}"):
            await llm.generate([LLMMessage("user", "hi")])
        with pytest.raises(LLMError, match="Cannot connect"):
            await llm.list_available_models()


async def test_missing_model_says_to_pull_it(fake_ollama: FakeServer) -> None:
    _, server = fake_ollama
    async with LLMProviderFactory.create("ollama", {"base_url": server.url, "model": "mistral"}) as llm:
        with pytest.raises(LLMError, match="ollama pull mistral"):
            await llm.generate([LLMMessage("user", "hi")])


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(LLMError, match="unknown provider 'cohere'"):
        LLMProviderFactory.create("cohere")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"base_url": "localhost:11434"}, "invalid ollama config: base_url: must be an http(s) URL"),
        ({"base_url": 11434}, "invalid ollama config: base_url: Input should be a valid string"),
        ({"timeout": 0}, "invalid ollama config: timeout: expected a number of seconds above 0, got 0"),
        ({"timeout": "10"}, "invalid ollama config: timeout: expected a number of seconds above 0, got '10'"),
    ],
)
def test_a_bad_config_is_an_llm_error_naming_the_setting(config: dict[str, object], message: str) -> None:
    with pytest.raises(LLMError) as caught:
        LLMProviderFactory.create("ollama", config)
    assert str(caught.value).startswith(message)


async def test_a_backend_slower_than_the_timeout_is_an_llm_error(fake_ollama: FakeServer) -> None:
    fake, server = fake_ollama
    fake.queue(Reply(content="late", delay_first=1.5), Reply(content="late", delay_first=1.5))
    prompt = [LLMMessage(LLMRole.USER, "hi")]
    with anyio.fail_after(10):
        async with LLMProviderFactory.create("ollama", {"base_url": server.url, "timeout": 0.5}) as llm:
            with pytest.raises(LLMError, match=r"ollama backend at .*: its first-token timeout \(0.5 s\)"):
                await llm.generate(prompt)
            with pytest.raises(LLMError, match=r"its first-token timeout \(0.5 s\) ran out"):
                [text async for text in llm.generate_stream(prompt)]


@pytest.mark.parametrize(
    ("timeouts", "reply", "expected"),
    [
        (Timeouts(idle=0.5), Reply(pieces=["a", "b"], delay_between=2), r"its idle timeout \(0.5 s\)"),
        (Timeouts(total=1), Reply(pieces=["a"] * 20, delay_between=0.25), r"its total timeout \(1 s\)"),
    ],
    ids=["idle", "total"],
)
async def test_a_stream_that_stalls_or_runs_too_long_is_an_llm_error(
    fake_ollama: FakeServer, timeouts: Timeouts, reply: Reply, expected: str
) -> None:
    fake, server = fake_ollama
    fake.queue(reply)
    backend = OllamaBackend(name="ollama", type="ollama", base_url=server.url, timeouts=timeouts)
    pieces: list[str] = []
    with anyio.fail_after(10):
        async with LLMProvider("ollama", backend, "llama3.2") as llm:
            with pytest.raises(LLMError, match=expected):
                async for text in llm.generate_stream([LLMMessage(LLMRole.USER, "hi")]):
                    pieces.append(text)
    assert pieces[0] == "a" and len(pieces) < len(reply.stream_pieces())


async def test_openai_provider_from_env_against_an_openai_compatible_server() -> None:
    fake = FakeOpenAI(api_key="sk-lib")
    fake.queue(Reply(content="Hi from OpenAI", prompt_eval_count=3, eval_count=4), Reply(pieces=["a", "b"]))
    with serve(fake.app) as server:
        env = {
            "OPENAI_API_KEY": "sk-lib",
            "OPENAI_MODEL": "gpt-4o-mini",
            "OPENAI_BASE_URL": server.url + "/v1",
        }
        async with LLMProviderFactory.create_from_env("openai", env) as llm:
            reply = await llm.generate([LLMMessage(LLMRole.USER, "hi")])
            pieces = [text async for text in llm.generate_stream([LLMMessage(LLMRole.USER, "more")])]
            assert await llm.is_model_available() is True
    assert (reply.content, reply.model, reply.usage["total_tokens"]) == ("Hi from OpenAI", "gpt-4o-mini", 7)
    assert pieces == ["a", "b"]
    assert fake.requests[0][2]["authorization"] == "Bearer sk-lib"


def test_cloud_providers_need_a_key() -> None:
    with pytest.raises(LLMError, match="openai provider needs an api_key"):
        LLMProviderFactory.create_from_env("openai", {})


async def test_gemini_provider_against_the_native_api() -> None:
    fake = FakeGemini(api_key="gm-lib")
    fake.queue(Reply(content="Hola", prompt_eval_count=2, eval_count=1), Reply(pieces=["x", "y"]))
    with serve(fake.app) as server:
        config = {"api_key": "gm-lib", "model": "gemini-2.5-flash", "base_url": server.url + "/v1beta"}
        async with LLMProviderFactory.create("gemini", config) as llm:
            reply = await llm.generate(
                [LLMMessage(LLMRole.SYSTEM, "Spanish"), LLMMessage(LLMRole.USER, "hi")]
            )
            pieces = [text async for text in llm.generate_stream([LLMMessage(LLMRole.USER, "more")])]
            models = await llm.list_available_models()
    assert (reply.content, reply.usage["total_tokens"]) == ("Hola", 3)
    assert pieces == ["x", "y"]
    assert "gemini-2.5-flash" in models
    assert fake.chat_bodies()[0]["systemInstruction"]["parts"] == [{"text": "Spanish"}]
    assert all(headers["x-goog-api-key"] == "gm-lib" for _, _, headers in fake.requests)
    assert all("gm-lib" not in path for path, _, _ in fake.requests)
