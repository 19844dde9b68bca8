"""The provider guide's library API against a fake Ollama over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypedDict

import anyio
import pytest
from starlette.requests import Request
from starlette.responses import Response

from gateway.config import Config, OllamaBackend, Timeouts, parse_config
from gateway.llm import MAX_CONNECTIONS, LLMError, LLMMessage, LLMProvider, LLMProviderFactory, LLMRole
from tests.fakes.faulty_server import FaultyOllama, reply
from tests.fakes.gemini_server import FakeGemini
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread, free_port, serve, unaccepting_address

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
        ({"modle": "qwen"}, "invalid ollama config: unknown setting 'modle'; known: base_url, model,"),
        (
            {"temperature": "warm"},
            "invalid ollama config: temperature: expected a number from 0 to 2, got 'warm'",
        ),
        ({"temperature": 3}, "invalid ollama config: temperature: expected a number from 0 to 2, got 3"),
        ({"model": 7}, "invalid ollama config: model: expected a model name, got 7"),
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


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OLLAMA_BASE_URL": "localhost:11434"}, "environment: OLLAMA_BASE_URL: must be an http(s) URL"),
        (
            {"LLM_PROVIDER": "openai", "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "api.example.com/v1"},
            "environment: OPENAI_BASE_URL: must be an http(s) URL",
        ),
    ],
)
def test_a_bad_url_in_the_environment_is_named_by_its_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(LLMError) as caught:
        LLMProviderFactory.create_from_env(None, environ)
    assert str(caught.value).startswith(message)


def test_a_blank_llm_provider_is_ollama_as_serve_reads_it() -> None:
    assert LLMProviderFactory.create_from_env(None, {"LLM_PROVIDER": "  "}).name == "ollama"


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


class PrivacyTag(TypedDict, total=False):
    """The two ways to mark a call private: the argument, or the metadata's key."""

    privacy: str
    metadata: dict[str, str]


PRIVATE_TAGS: list[PrivacyTag] = [{"privacy": "private"}, {"metadata": {"privacy": "private"}}]


@pytest.mark.parametrize("tag", PRIVATE_TAGS, ids=["argument", "metadata"])
async def test_a_private_request_to_a_cloud_backend_is_refused_before_anything_is_sent(
    tag: PrivacyTag,
) -> None:
    cloud = FakeOpenAI(api_key="sk-lib")
    with serve(cloud.app) as server:
        url = server.url + "/v1"
        async with LLMProviderFactory.create("openai", {"api_key": "sk-lib", "base_url": url}) as llm:
            with pytest.raises(LLMError, match=f"private and the openai backend at {url} is not local"):
                await llm.generate([LLMMessage(LLMRole.USER, "Summarise this patient's file")], **tag)
            with pytest.raises(LLMError, match="is not local"):
                [text async for text in llm.generate_stream([LLMMessage(LLMRole.USER, "file")], **tag)]
            assert (await llm.generate([LLMMessage(LLMRole.USER, "hi")], privacy="public")).content
    assert [body["messages"][0]["content"] for body in cloud.chat_bodies()] == ["hi"]


async def test_an_unknown_privacy_value_is_an_llm_error_naming_the_field(fake_ollama: FakeServer) -> None:
    fake, server = fake_ollama
    async with LLMProviderFactory.create("ollama", {"base_url": server.url}) as llm:
        with pytest.raises(LLMError, match=r"metadata.privacy must be 'private' or 'public', got 'secret'"):
            await llm.generate([LLMMessage(LLMRole.USER, "hi")], metadata={"privacy": "secret"})
    assert fake.chat_bodies() == []


async def test_a_private_request_to_an_ollama_cloud_model_is_refused(fake_ollama: FakeServer) -> None:
    fake, server = fake_ollama
    async with LLMProviderFactory.create("ollama", {"base_url": server.url, "model": "gpt-oss:cloud"}) as llm:
        with pytest.raises(LLMError, match=r"'gpt-oss:cloud' .* is an Ollama cloud model"):
            await llm.generate([LLMMessage(LLMRole.USER, "hi")], privacy="private")
    assert fake.chat_bodies() == []


async def test_a_private_request_to_an_ollama_cloud_model_under_a_local_name_is_refused() -> None:
    """`ollama cp gpt-oss:120b-cloud team-gpt`: only the instance's /api/show tells it is remote."""
    fake = FakeOllama(models=["llama3.2"], cloud=["team-gpt"])
    prompt = [LLMMessage(LLMRole.USER, "Summarise this patient's file")]
    with serve(fake.app) as server:
        async with LLMProviderFactory.create("ollama", {"base_url": server.url, "model": "team-gpt"}) as llm:
            with pytest.raises(LLMError, match=r"'team-gpt' .* is an Ollama cloud model") as refused:
                await llm.generate(prompt, privacy="private")
            with pytest.raises(LLMError, match=r"'team-gpt' .* is an Ollama cloud model"):
                [text async for text in llm.generate_stream(prompt, privacy="private")]
            assert (await llm.generate(prompt)).content  # public: the cloud model may serve it
    assert refused.value.code == "privacy_violation"
    assert [body["messages"][0]["content"] for body in fake.chat_bodies()] == [prompt[0].content]
    assert [path for path, _ in fake.requests].count("/api/show") == 1  # asked once, for both


async def test_a_private_request_is_refused_when_ollama_cannot_say_the_model_is_local(
    fake_ollama: FakeServer,
) -> None:
    fake, server = fake_ollama
    async with LLMProviderFactory.create("ollama", {"base_url": server.url, "model": "mystery"}) as llm:
        with pytest.raises(
            LLMError, match=r"whether the model 'mystery' on the ollama backend at .* is local"
        ):
            await llm.generate([LLMMessage(LLMRole.USER, "hi")], privacy="private")
    assert fake.chat_bodies() == []


async def test_only_a_private_request_waits_to_learn_that_the_ollama_model_is_local(
    fake_ollama: FakeServer,
) -> None:
    """A public request goes out at once; a private one only once /api/show has answered, and then
    the answer is kept for the model."""
    fake, server = fake_ollama
    prompt = [LLMMessage(LLMRole.USER, "hi")]
    async with LLMProviderFactory.create("ollama", {"base_url": server.url, "model": "llama3.2"}) as llm:
        await llm.generate(prompt)
        assert fake.requests[0][0] == "/api/chat"
        await llm.generate(prompt, model="qwen2.5:0.5b", privacy="private")
        assert "".join(
            [t async for t in llm.generate_stream(prompt, model="qwen2.5:0.5b", privacy="private")]
        )
    asked = [path for path, body in fake.requests if body and body.get("model") == "qwen2.5:0.5b"]
    assert asked == ["/api/show", "/api/chat", "/api/chat"]


def cloud_and_local(ollama_url: str, cloud_url: str) -> Config:
    """A gateway with `gpt` only on a cloud backend and `llama3.2` on a local Ollama."""
    cloud = {"name": "openai", "type": "openai", "base_url": cloud_url + "/v1", "api_key_env": "UPSTREAM_KEY"}
    data = {
        "backends": [{"name": "ollama-1", "type": "ollama", "base_url": ollama_url}, cloud],
        "models": [
            {"name": "gpt", "deployments": [{"backend": "openai", "model": "gpt-4o-mini"}]},
            {"name": "llama3.2", "deployments": [{"backend": "ollama-1", "model": "llama3.2"}]},
        ],
    }
    return parse_config(data, "test")


@pytest.mark.parametrize("tag", PRIVATE_TAGS, ids=["argument", "metadata"])
async def test_a_private_request_through_a_gateway_reaches_it_as_private(
    fake_ollama: FakeServer, start_gateway: Callable[..., ServerThread], tag: PrivacyTag
) -> None:
    """The library's OpenAI-compatible provider in front of a gateway marked local: the gateway
    gets the tag (as its `x-privacy` header), so it keeps the request off its cloud backend."""
    ollama, ollama_server = fake_ollama
    cloud = FakeOpenAI(api_key="sk-upstream")
    with serve(cloud.app) as cloud_server:
        gateway = start_gateway(
            cloud_and_local(ollama_server.url, cloud_server.url), {"UPSTREAM_KEY": "sk-upstream"}
        )
        config = {"base_url": gateway.url + "/v1", "api_key": "unused", "local": True, "timeout": 10}
        prompt = [LLMMessage(LLMRole.USER, "Summarise this patient's file")]
        async with LLMProviderFactory.create("openai", config) as llm:
            with pytest.raises(LLMError, match="private"):
                await llm.generate(prompt, model="gpt", **tag)
            with pytest.raises(LLMError, match="private"):
                [text async for text in llm.generate_stream(prompt, model="gpt", **tag)]
            reply = await llm.generate(prompt, model="llama3.2", **tag)
            assert await llm.generate(prompt, model="gpt")  # untagged: public, the cloud serves it
    assert reply.content == "Hello there!"
    assert len(ollama.chat_bodies()) == 1
    assert len(cloud.chat_bodies()) == 1


async def test_calls_beyond_the_connection_limit_wait_for_a_connection_within_their_deadline(
    fake_ollama: FakeServer,
) -> None:
    """The wait for one of the provider's connections is bounded by the call's deadline (here 10 s),
    not by its connect timeout (0.5 s), which the first answers (1.5 s each) outlast."""
    fake, server = fake_ollama
    fake.queue(*[Reply(content="late", delay_first=1.5) for _ in range(MAX_CONNECTIONS + 2)])
    timeouts = Timeouts(connect=0.5, first_token=10, total=10)
    backend = OllamaBackend(name="ollama", type="ollama", base_url=server.url, timeouts=timeouts)
    prompt = [LLMMessage(LLMRole.USER, "hi")]

    async def stream(llm: LLMProvider) -> str:
        return "".join([text async for text in llm.generate_stream(prompt)])

    with anyio.fail_after(20):
        async with LLMProvider("ollama", backend, "llama3.2") as llm:
            replies, streamed = await asyncio.gather(
                asyncio.gather(*[llm.generate(prompt) for _ in range(MAX_CONNECTIONS + 1)]), stream(llm)
            )
    assert [reply.content for reply in replies] == ["late"] * (MAX_CONNECTIONS + 1)
    assert streamed == "late"


def test_one_provider_serves_one_asyncio_run_after_another(fake_ollama: FakeServer) -> None:
    """A provider made once (create is synchronous) and called from sync code, each call in its
    own event loop: each loop gets its own connections, closed when that loop shuts down."""
    fake, server = fake_ollama
    fake.queue(Reply(content="one"), Reply(content="two"), Reply(pieces=["th", "ree"]), Reply(content="four"))
    llm = LLMProviderFactory.create("ollama", {"base_url": server.url, "timeout": 10})
    prompt = [LLMMessage(LLMRole.USER, "hi")]

    async def stream() -> str:
        return "".join([text async for text in llm.generate_stream(prompt)])

    answers = [
        asyncio.run(asyncio.wait_for(llm.generate(prompt), 10)).content,
        asyncio.run(asyncio.wait_for(llm.generate(prompt), 10)).content,
        asyncio.run(asyncio.wait_for(stream(), 10)),
        asyncio.run(asyncio.wait_for(llm.generate(prompt), 10)).content,
    ]
    assert asyncio.run(asyncio.wait_for(llm.is_model_available(), 10)) is True
    asyncio.run(llm.aclose())
    assert answers == ["one", "two", "three", "four"]


class WedgedOllama(FakeOllama):
    """Takes the connection, and answers its model list only after a while."""

    async def tags(self, request: Request) -> Response:
        await anyio.sleep(3)
        return await super().tags(request)


async def test_listing_models_is_bounded_by_the_timeout() -> None:
    with serve(WedgedOllama().app) as server:
        async with LLMProviderFactory.create("ollama", {"base_url": server.url, "timeout": 0.5}) as llm:
            with anyio.fail_after(10):
                with pytest.raises(
                    LLMError, match=r"ollama backend at .*: its first-token timeout \(0.5 s\)"
                ):
                    await llm.list_available_models()
                with pytest.raises(LLMError, match=r"its first-token timeout \(0.5 s\) ran out"):
                    await llm.is_model_available()


async def test_an_llm_error_keeps_the_backends_status_and_retry_after() -> None:
    fake = FakeOpenAI(api_key="sk-lib")
    fake.queue(Reply(status=429, error_text="Rate limit reached"), Reply(status=429, error_text="again"))
    with serve(fake.app) as server:
        config = {"api_key": "sk-lib", "base_url": server.url + "/v1"}
        async with LLMProviderFactory.create("openai", config) as llm:
            with pytest.raises(LLMError) as limited:
                await llm.generate([LLMMessage(LLMRole.USER, "hi")])
            with pytest.raises(LLMError) as streamed:
                [text async for text in llm.generate_stream([LLMMessage(LLMRole.USER, "hi")])]
            with pytest.raises(LLMError) as unknown:
                await llm.generate([LLMMessage(LLMRole.USER, "hi")], model="gpt-9")
    assert (limited.value.status, limited.value.retry_after) == (429, 7.0)
    assert (streamed.value.status, streamed.value.retry_after) == (429, 7.0)
    assert (unknown.value.status, unknown.value.code, unknown.value.retry_after) == (
        404,
        "model_not_found",
        None,
    )


async def test_an_ollama_429_keeps_its_retry_after() -> None:
    with FaultyOllama().running() as server:
        server.queue([reply(429, {"error": "server busy"}, ("Retry-After", "30"))])
        async with LLMProviderFactory.create("ollama", {"base_url": server.url}) as llm:
            with pytest.raises(LLMError, match="server busy") as caught:
                await llm.generate([LLMMessage(LLMRole.USER, "hi")])
    assert (caught.value.status, caught.value.retry_after) == (429, 30.0)


async def test_an_unreachable_backend_is_a_503_without_retry_after() -> None:
    async with LLMProviderFactory.create("ollama", {"base_url": f"http://127.0.0.1:{free_port()}"}) as llm:
        with pytest.raises(LLMError, match="Cannot connect") as caught:
            await llm.generate([LLMMessage(LLMRole.USER, "hi")])
    assert (caught.value.status, caught.value.retry_after) == (503, None)


@pytest.mark.parametrize("provider", ["openai", "gemini"])
async def test_a_wrong_api_key_names_the_backend_and_the_librarys_setting(provider: str) -> None:
    """Gemini answers a wrong key with a 400 whose details say API_KEY_INVALID, not a 401."""
    fake = FakeOpenAI(api_key="right") if provider == "openai" else FakeGemini(api_key="right")
    with serve(fake.app) as server:
        url = server.url + ("/v1" if provider == "openai" else "/v1beta")
        config = {"api_key": "wrong", "base_url": url, "model": "gemini-2.5-flash"}
        async with LLMProviderFactory.create(provider, config) as llm:
            with pytest.raises(LLMError) as caught:
                await llm.generate([LLMMessage(LLMRole.USER, "hi")])
    message = str(caught.value)
    assert message == (
        f"the {provider} backend at {url} refused the API key (401); check the provider's api_key"
        f" ({provider.upper()}_API_KEY for create_from_env)"
    )
    assert caught.value.status == 401


async def test_a_stream_argument_points_to_generate_stream(fake_ollama: FakeServer) -> None:
    fake, server = fake_ollama
    prompt = [LLMMessage(LLMRole.USER, "hi")]
    async with LLMProviderFactory.create("ollama", {"base_url": server.url}) as llm:
        with pytest.raises(LLMError, match="generate takes no stream argument: use generate_stream"):
            await llm.generate(prompt, stream=True)
        with pytest.raises(LLMError, match="generate_stream always streams"):
            [text async for text in llm.generate_stream(prompt, stream=False)]
    assert fake.chat_bodies() == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"temperature": "hot"},
            "invalid request: Invalid value for 'temperature': Input should be a valid number.",
        ),
        (
            {"max_tokens": "many"},
            "invalid request: Invalid value for 'max_tokens': Input should be a valid integer.",
        ),
    ],
)
async def test_a_bad_parameter_is_an_llm_error_naming_the_field(
    fake_ollama: FakeServer, params: dict[str, object], message: str
) -> None:
    fake, server = fake_ollama
    async with LLMProviderFactory.create("ollama", {"base_url": server.url}) as llm:
        with pytest.raises(LLMError) as caught:
            # values of the wrong type on purpose: the provider must refuse them naming the field
            await llm.generate([LLMMessage(LLMRole.USER, "hi")], **params)  # type: ignore[arg-type]
    assert str(caught.value) == message
    assert fake.chat_bodies() == []


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
async def test_a_host_that_never_takes_the_connection_is_a_connect_timeout(stream: bool) -> None:
    """With `timeout` at or below the 5 s connect timeout, connecting is still what is reported."""
    prompt = [LLMMessage(LLMRole.USER, "hi")]
    with unaccepting_address() as url:
        async with LLMProviderFactory.create("ollama", {"base_url": url, "timeout": 2}) as llm:
            with anyio.fail_after(10), pytest.raises(LLMError) as caught:
                if stream:
                    [text async for text in llm.generate_stream(prompt)]
                else:
                    await llm.generate(prompt)
    assert str(caught.value) == f"Timed out connecting to Ollama server at {url}"
    assert caught.value.status == 504
