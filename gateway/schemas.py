"""OpenAI wire models (requests, validated once) and the internal values providers produce.

Requests are pydantic models with `extra="allow"`, so pass-through backends keep fields the
gateway does not know. They are strict, as OpenAI's API is: `"stream": "yes"` or
`"max_tokens": "5"` is a 400 naming the field, not a guess (an integer still stands for a float).
Responses are not validated: providers return `Completion` and yield `Chunk` (plain slotted
dataclasses, cheap on the hot path) and `relay` turns them into bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


MAX_MESSAGES = 4096  # per chat request; far beyond any context window, far below a flood
MAX_EMBEDDING_INPUTS = 2048  # per embeddings request, OpenAI's limit
# Characters of a requested model name: Ollama's longest (host, namespace, name and tag at their
# limits) takes under 600. Each is written into the request's log line and audit record.
MAX_MODEL_NAME = 1024


class Wire(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    # Fields refused with 400 when present, and what to send instead (checked before validation,
    # by gateway/body.py: as fields they would add to every request's validation).
    REFUSED: ClassVar[Mapping[str, str]] = {}


class ImageURL(Wire):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(Wire):
    type: Literal["text"]
    text: str


class ImagePart(Wire):
    type: Literal["image_url"]
    # Some clients send the non-spec short form {"image_url": "data:..."}; accept it.
    image_url: ImageURL | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url

    @property
    def url_field(self) -> str:
        """Where the part holds its URL, for an error to name: `image_url.url`, or `image_url`."""
        return "image_url" if isinstance(self.image_url, str) else "image_url.url"


class AudioPart(Wire):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(Wire):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(Wire):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")
]


class FunctionCall(Wire):
    name: str
    arguments: str = ""


class ToolCall(Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class CustomInput(Wire):
    name: str
    input: str = ""


class CustomToolCall(Wire):
    """A call to a custom tool (OpenAI's freeform tools): served by OpenAI backends only."""

    id: str
    type: Literal["custom"]
    custom: CustomInput


def _kind(value: Any) -> str:
    """A tool call's union tag: its type, `function` when left out, as clients have done. The tags
    are no field's name (`function call`, not `function`): pydantic puts the tag in an error's
    location, where gateway/body.py would take it for the call's `function` field."""
    kind = value.get("type", "function") if isinstance(value, dict) else getattr(value, "type", "function")
    return f"{kind} call"


AnyToolCall = Annotated[
    Annotated[ToolCall, Tag("function call")] | Annotated[CustomToolCall, Tag("custom call")],
    Discriminator(
        _kind,
        custom_error_type="invalid_tool_call_type",
        custom_error_message="a tool call's 'type' must be 'function' or 'custom'",
    ),
]


class Message(Wire):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[AnyToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _some_parts(cls, content: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        if content == []:  # as OpenAI's schema has it (minItems 1); a string may be empty
            raise ValueError("a list of parts needs at least one part")
        return content

    @model_validator(mode="after")
    def _content_rules(self) -> Message:
        if self.content is None and self.role not in ("assistant", "function"):
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.role == "tool" and not (self.tool_call_id or self.name):
            raise ValueError("a tool message needs 'tool_call_id'")
        if isinstance(self.content, list) and self.role != "user":  # as OpenAI's schema has it
            kinds = (TextPart, RefusalPart) if self.role == "assistant" else (TextPart,)
            for j, part in enumerate(self.content):
                if not isinstance(part, kinds):
                    raise ValueError(f"{self.role} messages take no {part.type!r} parts (content[{j}])")
        return self

    def text(self) -> str:
        """The message's text: string content as is, text parts joined with newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(
            part.text if isinstance(part, TextPart) else part.refusal
            for part in self.content
            if isinstance(part, TextPart | RefusalPart)
        )

    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [part.url for part in self.content if isinstance(part, ImagePart)]


class FunctionDef(Wire):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Wire):
    type: Literal["function"]
    function: FunctionDef


class CustomDef(Wire):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    format: dict[str, Any] | None = None  # free text, or a grammar the input must follow


class CustomTool(Wire):
    """OpenAI's custom tool: the model calls it with free text rather than JSON arguments."""

    type: Literal["custom"]
    custom: CustomDef


AnyTool = Annotated[Tool | CustomTool, Field(discriminator="type")]


class JSONSchemaFormat(Wire):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class StreamOptions(Wire):
    include_usage: bool | None = None


class ChatRequest(Wire):
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    tools: list[AnyTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning_effort: str | None = None  # checked here once: each translation maps its names
    # OpenAI's deprecated forms of `tools` and `tool_choice`: the answer would come in the newer
    # form (`tool_calls`, not `function_call`), which a client written for them does not read.
    REFUSED: ClassVar[Mapping[str, str]] = {"functions": "tools", "function_call": "tool_choice"}
    # No private attributes: pydantic sets them up on every validation (1.7 us a request, timeit).
    # The images fetched for a request are kept by gateway/images.py instead.

    def conversation(self) -> str:
        """What identifies a conversation across its turns: the leading system or developer messages
        and the first user message (later turns repeat them), as a short digest."""
        digest = hashlib.blake2b(digest_size=16)
        for message in self.messages:
            digest.update(message.role.encode() + b"\0" + message.text().encode() + b"\0")
            if message.role == "user":
                break
        return digest.hexdigest()

    def has_attachments(self) -> bool:
        """Whether any message carries content the PII detector cannot read: images, audio, files."""
        return any(
            not isinstance(part, TextPart | RefusalPart)
            for message in self.messages
            if isinstance(message.content, list)
            for part in message.content
        )

    def texts(self) -> Iterator[str]:
        """The conversation's text, for the estimate of its tokens (the PII detector reads every
        string in the body: `body.written`)."""
        for message in self.messages:
            yield message.text()
            for call in message.tool_calls or ():
                yield call.function.arguments if isinstance(call, ToolCall) else call.custom.input

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_answer_tokens(self) -> int | None:
        """What all its choices may generate: `max_tokens` is per choice, and there are `n`."""
        per_choice = self.max_output_tokens
        return None if per_choice is None else per_choice * (self.n or 1)

    @property
    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def alternatives(self) -> int | None:
        """With `logprobs: true`, how many alternatives per token the client asked for
        (`top_logprobs`, 0 by default); None when it asked for no log probabilities."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


MAX_PROMPTS = 128  # per completions request: each is a request to a backend of its own, run at once
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's `max_tokens` when a completions request gives none


class CompletionRequest(Wire):
    """OpenAI's legacy text completion request (CreateCompletionRequest). Each prompt is served as
    a chat request with one user message, so the model's chat template applies to it."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    prompt: str | list[str]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    best_of: int | None = Field(default=None, ge=1, le=20)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None  # the gateway's own (privacy), as on chat
    REFUSED: ClassVar[Mapping[str, str]] = ChatRequest.REFUSED

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, value: Any) -> Any:
        """Token ids (a list of integers, or of lists of them) are OpenAI's too, but the gateway
        has no tokenizer to turn them back into the text a chat template takes."""
        if isinstance(value, list) and value and all(isinstance(item, int | list) for item in value):
            raise ValueError(
                "token ids are not served here (the gateway has no tokenizer to read them):"
                " send the prompt as a string or a list of strings"
            )
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty array")
        if isinstance(value, list) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def choices(self) -> int:
        """How many completions the answer holds: `n` for each prompt."""
        return (self.n or 1) * len(self.prompts)

    @property
    def answer_tokens(self) -> int:
        """What every completion together may generate, for the rate limiter's estimate."""
        return (self.max_tokens or DEFAULT_COMPLETION_TOKENS) * self.choices

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class EmbeddingRequest(Wire):
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    metadata: dict[str, str] | None = None  # the gateway's own (privacy); never sent upstream

    @field_validator("input")
    @classmethod
    def _input_present(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be an empty string")
            return value
        if not value:
            raise ValueError("must not be an empty array")
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(value)}")
        for index, item in enumerate(value):
            if isinstance(item, str | list) and not item:
                raise ValueError(f"item [{index}] is empty")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else [s for s in self.input if isinstance(s, str)]

    def inputs(self) -> int:
        """How many vectors the answer holds: one for a string or one array of token ids."""
        return 1 if isinstance(self.input, str) or isinstance(self.input[0], int) else len(self.input)

    def token_ids(self) -> int:
        """How many pre-tokenized ids the input holds (0 for text input)."""
        if isinstance(self.input, str):
            return 0
        return sum(
            1 if isinstance(item, int) else len(item) if isinstance(item, list) else 0 for item in self.input
        )


# ---- internal values (what providers return; relay encodes them) ----


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The breakdowns OpenAI reports, when the backend gave them: prompt tokens read from its
    # cache, and the part of completion_tokens spent on reasoning (which completion_tokens includes).
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens is not None:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens is not None:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out


@dataclass(slots=True)
class ToolCallDelta:
    """A tool call or a fragment of one. `id` and `name` only on a call's first fragment."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""  # a custom tool's input
    custom: bool = False  # a call to a custom tool (OpenAI backends only)
    # Fields an OpenAI-compatible backend adds to a call, passed on as they came: the client sends
    # them back with the call (Gemini's OpenAI endpoint: `extra_content` with a thought signature).
    extra: dict[str, Any] | None = None


@dataclass(slots=True)
class Chunk:
    """One step of a streamed answer for one choice, in backend-neutral form."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    index: int = 0
    # Facts worth telling the client at the end, e.g. that the backend silently truncated the prompt.
    notices: dict[str, str] | None = None
    refusal: str = ""
    logprobs: list[dict[str, Any]] | None = None  # OpenAI's `logprobs.content` entries for this delta
    # Fields for the envelope of every event from here on (an OpenAI backend's system_fingerprint).
    envelope: dict[str, str] | None = None

    @property
    def has_output(self) -> bool:
        return bool(self.content or self.tool_calls or self.reasoning or self.refusal)


@dataclass(slots=True)
class Choice:
    index: int = 0
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    refusal: str | None = None
    logprobs: list[dict[str, Any]] | None = None  # OpenAI's `logprobs.content`, when requested
    annotations: list[Any] | None = None  # an OpenAI backend's URL citations, passed on


@dataclass(slots=True)
class Completion:
    choices: list[Choice]
    usage: Usage = field(default_factory=Usage)
    # False when the backend reported no usage: the client still gets zeros (the contract's rule),
    # but nothing counts them as tokens used, and the rate limiter keeps its estimate.
    counted: bool = True
    # Facts worth telling the client, e.g. that the backend silently truncated the prompt.
    notices: dict[str, str] = field(default_factory=dict)
    # Top-level fields an OpenAI backend sent that the client may use (`system_fingerprint`,
    # `service_tier`), passed on as they came.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int = 0
    counted: bool = True  # False when the backend reported no count (Completion.counted)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model a backend serves, as its own inventory reports it."""

    id: str
    created: int = 0
    owned_by: str = "library"
    remote: bool = False
    capabilities: tuple[str, ...] = ()
