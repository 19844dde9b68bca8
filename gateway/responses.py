"""The JSON Schemas of what the gateway answers, for its OpenAPI document (gateway/openapi.py).

Written to match what `relay`, the route handlers and `errors` produce: a test validates real
answers against them (tests/e2e/test_openapi.py).
"""

from __future__ import annotations

from typing import Any

REF = "#/components/schemas/{model}"

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


INTEGER = {"type": "integer"}
STRING = {"type": "string"}
FINISH_REASON = {"type": "string", "enum": ["stop", "length", "tool_calls", "content_filter"]}

ERROR: Schema = {
    "type": "object",
    "description": "OpenAI's error shape; every error the gateway answers has it.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": STRING,
                "type": STRING,
                "param": nullable(STRING),
                "code": nullable(STRING),
            },
        }
    },
}

USAGE: Schema = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": INTEGER,
        "completion_tokens": INTEGER,
        "total_tokens": INTEGER,
        "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": INTEGER}},
        "completion_tokens_details": {"type": "object", "properties": {"reasoning_tokens": INTEGER}},
    },
}

LOGPROBS: Schema = {
    "type": "object",
    "description": "With `logprobs: true`, from backends that report them: one entry per token.",
    "required": ["content"],
    "properties": {
        "content": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["token", "logprob"],
                "properties": {
                    "token": STRING,
                    "logprob": {"type": "number"},
                    "bytes": nullable({"type": "array", "items": INTEGER}),
                    "top_logprobs": {"type": "array", "items": {"type": "object"}},
                },
            },
        },
        "refusal": {"type": "null"},
    },
}

TOOL_CALL: Schema = {
    "anyOf": [
        {
            "type": "object",
            "required": ["id", "type", "function"],
            "properties": {
                "id": STRING,
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "required": ["name", "arguments"],
                    "properties": {"name": STRING, "arguments": STRING},
                },
            },
        },
        {
            "type": "object",
            "description": "A custom tool's call (from OpenAI backends): free text input.",
            "required": ["id", "type", "custom"],
            "properties": {
                "id": STRING,
                "type": {"const": "custom"},
                "custom": {
                    "type": "object",
                    "required": ["name", "input"],
                    "properties": {"name": STRING, "input": STRING},
                },
            },
        },
    ]
}

CHAT_COMPLETION: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": STRING,
        "object": {"const": "chat.completion"},
        "created": INTEGER,
        "model": STRING,
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "logprobs", "finish_reason"],
                "properties": {
                    "index": INTEGER,
                    "message": {
                        "type": "object",
                        "required": ["role", "content", "refusal"],
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": nullable(STRING),
                            "refusal": nullable(STRING),
                            "reasoning_content": STRING,
                            "tool_calls": {"type": "array", "items": ref("ToolCall")},
                            "annotations": {"type": "array", "description": "An OpenAI backend's, as sent."},
                        },
                    },
                    "logprobs": nullable(ref("Logprobs")),
                    "finish_reason": FINISH_REASON,
                },
            },
        },
        "usage": ref("Usage"),
        "system_fingerprint": {"type": "string", "description": "An OpenAI backend's, as sent."},
        "service_tier": {"type": "string", "description": "An OpenAI backend's, as sent."},
    },
}

TOOL_CALL_DELTA: Schema = {
    "type": "object",
    "description": (
        "A tool call's first fragment carries id, type and name; later ones only arguments (a custom"
        " tool's: input)."
    ),
    "required": ["index"],
    "properties": {
        "index": INTEGER,
        "id": STRING,
        "type": {"enum": ["function", "custom"]},
        "function": {"type": "object", "properties": {"name": STRING, "arguments": STRING}},
        "custom": {"type": "object", "properties": {"name": STRING, "input": STRING}},
    },
}

CHAT_COMPLETION_CHUNK: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": STRING,
        "object": {"const": "chat.completion.chunk"},
        "created": INTEGER,
        "model": STRING,
        "choices": {
            "type": "array",
            "description": "Empty in the last chunk, which carries the usage (with `include_usage`).",
            "items": {
                "type": "object",
                "required": ["index", "delta", "logprobs", "finish_reason"],
                "properties": {
                    "index": INTEGER,
                    "delta": {
                        "type": "object",
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": nullable(STRING),
                            "refusal": STRING,
                            "reasoning_content": STRING,
                            "tool_calls": {"type": "array", "items": ref("ToolCallDelta")},
                        },
                    },
                    "logprobs": nullable(ref("Logprobs")),
                    "finish_reason": nullable(FINISH_REASON),
                },
            },
        },
        "usage": {
            "description": "Only with `stream_options.include_usage`: null, then set in the last chunk.",
            "anyOf": [ref("Usage"), {"type": "null"}],
        },
    },
}


def _stream_event(chunk: str) -> Schema:
    """One server-sent event of a stream whose chunks are `chunk` (a component's name)."""
    return {
        "type": "object",
        "description": (
            "One server-sent event: a chunk, an error object when the stream fails after it started"
            " (the stream then ends), or `[DONE]` last. Comment lines (`: name=value`) carry notices."
        ),
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [ref(chunk), ref("Error")]},
                },
            },
        },
    }


STREAM_EVENT = _stream_event("ChatCompletionChunk")


LEGACY_LOGPROBS: Schema = {
    "type": "object",
    "description": (
        "With `logprobs: K`, from backends that report them: each token, its log probability, its"
        " K most likely alternatives with the token itself, and its offset in `text`."
    ),
    "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    "properties": {
        "tokens": {"type": "array", "items": STRING},
        "token_logprobs": {"type": "array", "items": nullable({"type": "number"})},
        "top_logprobs": {
            "type": "array",
            "items": {"type": "object", "additionalProperties": nullable({"type": "number"})},
        },
        "text_offset": {"type": "array", "items": INTEGER},
    },
}


def _text_completion(chunk: bool) -> Schema:
    """A legacy completion, or (`chunk`) one event of its stream, which has the same shape."""
    finish = {"type": "string", "enum": ["stop", "length", "content_filter"]}
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"] + ([] if chunk else ["usage"]),
        "properties": {
            "id": STRING,
            "object": {"const": "text_completion"},
            "created": INTEGER,
            "model": STRING,
            "choices": {
                "type": "array",
                "description": "Numbered prompt_index * n + j."
                + (" Empty in the usage event." if chunk else ""),
                "items": {
                    "type": "object",
                    "required": ["text", "index", "logprobs", "finish_reason"],
                    "properties": {
                        "text": STRING,
                        "index": INTEGER,
                        "logprobs": nullable(ref("LegacyLogprobs")),
                        "finish_reason": nullable(finish) if chunk else finish,
                    },
                },
            },
            "usage": ref("Usage"),
            "system_fingerprint": {"type": "string", "description": "An OpenAI backend's, as sent."},
        },
    }


TEXT_STREAM_EVENT = _stream_event("TextCompletionChunk")

EMBEDDINGS: Schema = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": INTEGER,
                    "embedding": {
                        "description": "Floats, or with `encoding_format: base64` little-endian float32.",
                        "anyOf": [{"type": "array", "items": {"type": "number"}}, STRING],
                    },
                },
            },
        },
        "model": STRING,
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "total_tokens"],
            "properties": {"prompt_tokens": INTEGER, "total_tokens": INTEGER},
        },
    },
}

MODEL: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {"id": STRING, "object": {"const": "model"}, "created": INTEGER, "owned_by": STRING},
}

MODEL_LIST: Schema = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}},
}

READINESS: Schema = {
    "type": "object",
    "required": ["status", "backends"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "unavailable"]},
        "backends": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["type", "local", "up"],
                "properties": {"type": STRING, "local": {"type": "boolean"}, "up": {"type": "boolean"}},
            },
        },
    },
}


# By their names under the document's components.
COMPONENTS: dict[str, Schema] = {
    "Error": ERROR,
    "Usage": USAGE,
    "Logprobs": LOGPROBS,
    "ToolCall": TOOL_CALL,
    "ToolCallDelta": TOOL_CALL_DELTA,
    "ChatCompletion": CHAT_COMPLETION,
    "ChatCompletionChunk": CHAT_COMPLETION_CHUNK,
    "ChatCompletionStreamEvent": STREAM_EVENT,
    "LegacyLogprobs": LEGACY_LOGPROBS,
    "TextCompletion": _text_completion(chunk=False),
    "TextCompletionChunk": _text_completion(chunk=True),
    "TextCompletionStreamEvent": TEXT_STREAM_EVENT,
    "Embeddings": EMBEDDINGS,
    "Model": MODEL,
    "ModelList": MODEL_LIST,
    "Readiness": READINESS,
}
