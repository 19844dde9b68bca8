"""The gateway's own OpenAPI 3.1 document, served at GET /openapi.json.

It describes exactly what this gateway serves and answers, not all of OpenAI's API: request bodies
come from the pydantic models that validate them (`gateway.schemas`), response bodies from
`gateway.responses`, written to match what the gateway produces. Streams are documented per event
(OpenAPI before 3.2: a `text/event-stream` schema describes one event), each event's `data` being
a chunk, an error object, or `[DONE]`.
"""

from __future__ import annotations

import copy
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.config import Config
from gateway.responses import COMPONENTS, INTEGER, REF, STRING, Schema, ref
from gateway.schemas import MAX_PROMPTS, ChatRequest, CompletionRequest, EmbeddingRequest
from gateway.state import json_response, state_of

OPENAPI_VERSION = "3.1.0"


def package_version() -> str:
    try:
        return version("phoenix-gateway")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


# ---- request bodies: the validating models' own schemas, plus the rules their validators add ----

MESSAGE_RULES = [
    {
        "if": {"properties": {"role": {"enum": ["system", "developer", "tool", "function"]}}},
        "then": {
            "properties": {"content": {"anyOf": [{"not": {"type": "array"}}, {"items": ref("TextPart")}]}}
        },
    },
    {
        "if": {"properties": {"role": {"const": "assistant"}}},
        "then": {
            "properties": {
                "content": {
                    "anyOf": [
                        {"not": {"type": "array"}},
                        {"items": {"anyOf": [ref("TextPart"), ref("RefusalPart")]}},
                    ]
                }
            }
        },
    },
    {
        "if": {"properties": {"role": {"enum": ["system", "developer", "user", "tool"]}}},
        "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
    },
    {
        "if": {"properties": {"role": {"const": "tool"}}},
        "then": {
            "anyOf": [
                {
                    "required": ["tool_call_id"],
                    "properties": {"tool_call_id": {"type": "string", "minLength": 1}},
                },
                {"required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}},
            ]
        },
    },
]

RESPONSE_FORMAT_RULES = [
    {
        "if": {"properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["json_schema"], "properties": {"json_schema": {"not": {"type": "null"}}}},
    }
]


# What the completions route refuses beyond the fields' own types (gateway/legacy.py `check`);
# `best_of` other than `n` is refused too, which a schema cannot say.
COMPLETION_RULES = [
    {
        "not": {
            "required": ["echo", "logprobs"],
            "properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}},
        }
    }
]


def request_schemas(model_names: list[str]) -> dict[str, Schema]:
    """ChatRequest, CompletionRequest, EmbeddingRequest and every model they use, keyed by name
    for components."""
    schemas: dict[str, Schema] = {}
    for model in (ChatRequest, CompletionRequest, EmbeddingRequest):
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    completion = schemas["CompletionRequest"]
    completion["properties"]["prompt"] = {
        "description": "Text: one prompt, or several (each answered as its own chat request).",
        "anyOf": [STRING, {"type": "array", "items": STRING, "minItems": 1, "maxItems": MAX_PROMPTS}],
    }
    completion["properties"]["suffix"] = {"type": "null", "description": "Not served: null or left out."}
    completion["properties"]["best_of"]["description"] = "Equal to `n`, or left out."
    completion["allOf"] = COMPLETION_RULES
    for name in ("ChatRequest", "CompletionRequest", "EmbeddingRequest"):
        field = schemas[name]["properties"]["model"]
        field["description"] = "A configured model name or alias, or a name a pattern route accepts."
        if model_names:
            field["examples"] = model_names
    schemas["Message"]["allOf"] = MESSAGE_RULES
    schemas["ResponseFormat"]["allOf"] = RESPONSE_FORMAT_RULES
    return schemas


# ---- operations ----

STATUS_TEXT = {
    200: "OK",
    400: "Malformed JSON, a missing or wrongly typed field (`param` names it), options the backend rejects.",
    401: "Missing or unknown API key.",
    403: "The key may not use this model, or a private request has no local deployment.",
    404: "Unknown model (`code: model_not_found`).",
    408: "The body stopped arriving for `server.body_timeout` seconds (`code: request_timeout`).",
    413: "The body is larger than `server.max_body_bytes`.",
    415: "The body is compressed (a `content-encoding` other than `identity`).",
    429: (
        "Rate limited: the API key's requests or tokens per minute (with `retry-after`,"
        " `retry-after-ms` and `x-ratelimit-*`), the backend, or an instance's `max_inflight`."
    ),
    502: "The backend answered badly.",
    503: (
        "No backend reachable, the rate-limit store unreachable with `rate_limits.fail_open: false`,"
        " or cut at the shutdown deadline (`code: shutting_down`)."
    ),
    504: "A backend deadline ran out.",
}
ROUTED_ERRORS = (400, 401, 403, 404, 408, 413, 415, 429, 502, 503, 504)

REQUEST_ID = {
    "x-request-id": {
        "description": "The request's id: the caller's own when it sent a sane one, else a new one.",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    }
}
ROUTED_HEADERS = {
    **REQUEST_ID,
    "x-phoenix-privacy": {
        "description": "`public`, or `private;reason=...`: how the request was classified.",
        "schema": STRING,
    },
    "x-phoenix-backend": {"description": "The backend that answered.", "schema": STRING},
    **{
        f"x-ratelimit-{what}-{kind}": {"description": f"{text} ({kind} per minute).", "schema": schema}
        for kind in ("requests", "tokens")
        for what, text, schema in (
            ("limit", "The API key's limit, when it has one", INTEGER),
            ("remaining", "What is left of it after this request", INTEGER),
            ("reset", "Until the budget is whole again, as OpenAI writes it: 120ms, 1.5s, 6m0s", STRING),
        )
    },
}


def json_body(schema: Schema, description: str, headers: Schema | None = None) -> Schema:
    return {
        "description": description,
        "headers": headers or REQUEST_ID,
        "content": {"application/json": {"schema": schema}},
    }


def errors(*statuses: int, headers: Schema | None = None) -> dict[str, Schema]:
    return {str(status): json_body(ref("Error"), STATUS_TEXT[status], headers) for status in statuses}


def routed_post(summary: str, operation_id: str, request: str, ok: Schema, secured: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "tags": ["OpenAI"],
        "parameters": [
            {
                "name": "x-privacy",
                "in": "header",
                "required": False,
                "description": (
                    "`private` keeps the request on local backends (case-insensitive; the header's"
                    " name is `privacy.header`)."
                ),
                "schema": {"type": "string", "enum": ["private", "public"]},
            }
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(request)}}},
        "responses": {"200": ok, **errors(*ROUTED_ERRORS, headers=ROUTED_HEADERS)},
    }
    if secured:
        operation["security"] = [{"bearerAuth": []}]
    return operation


def document(config: Config) -> dict[str, Any]:
    secured = bool(config.auth.keys)
    names = [
        name for route in config.models if "*" not in route.name for name in (route.name, *route.aliases)
    ]
    chat_ok = {
        "description": "A completion; with `stream: true` server-sent events, one chunk per event.",
        "headers": ROUTED_HEADERS,
        "content": {
            "application/json": {"schema": ref("ChatCompletion")},
            "text/event-stream": {"schema": ref("ChatCompletionStreamEvent")},
        },
    }
    chat = routed_post("Create a chat completion", "createChatCompletion", "ChatRequest", chat_ok, secured)
    text_ok = {
        "description": (
            "A text completion (each prompt served as a chat request with one user message);"
            " with `stream: true` server-sent events of the same shape."
        ),
        "headers": ROUTED_HEADERS,
        "content": {
            "application/json": {"schema": ref("TextCompletion")},
            "text/event-stream": {"schema": ref("TextCompletionStreamEvent")},
        },
    }
    text = routed_post("Create a text completion", "createCompletion", "CompletionRequest", text_ok, secured)
    embed_ok = json_body(ref("Embeddings"), "The embeddings, one per input, in order.", ROUTED_HEADERS)
    embed = routed_post("Create embeddings", "createEmbedding", "EmbeddingRequest", embed_ok, secured)
    for operation in (chat, text, embed):  # the privacy header's name is configurable
        operation["parameters"][0]["name"] = config.privacy.header
    auth_errors: dict[str, Schema] = errors(401) if secured else {}
    security: dict[str, Any] = {"security": [{"bearerAuth": []}]} if secured else {}
    models: dict[str, Any] = {
        "summary": "List the models this gateway serves (those the caller's key may use)",
        "operationId": "listModels",
        "tags": ["OpenAI"],
        "responses": {"200": json_body(ref("ModelList"), "The models."), **auth_errors},
        **security,
    }
    model: dict[str, Any] = {
        "summary": "One model",
        "operationId": "retrieveModel",
        "tags": ["OpenAI"],
        "parameters": [
            {
                "name": "model_id",
                "in": "path",
                "required": True,
                "description": "The model's name; it may contain `/`.",
                "schema": {"type": "string", **({"examples": names} if names else {})},
            }
        ],
        "responses": {
            "200": json_body(ref("Model"), "The model."),
            **auth_errors,
            **errors(404),
        },
        **security,
    }
    ops: dict[str, Any] = {"tags": ["Operations"], "security": []}
    paths = {
        "/v1/chat/completions": {"post": chat},
        "/v1/completions": {"post": text},
        "/v1/embeddings": {"post": embed},
        "/v1/models": {"get": models},
        "/v1/models/{model_id}": {"get": model},
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers",
                "operationId": "healthz",
                **ops,
                "responses": {
                    "200": json_body(
                        {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
                        "Alive.",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: at least one backend answered its latest probe and is not ejected",
                "operationId": "readyz",
                **ops,
                "responses": {
                    "200": json_body(ref("Readiness"), "Ready."),
                    "503": json_body(
                        ref("Readiness"), "No backend answered its latest probe, or all are ejected."
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                **ops,
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4.",
                        "headers": REQUEST_ID,
                        "content": {"text/plain": {"schema": STRING}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                **ops,
                "responses": {"200": json_body({"type": "object"}, "The OpenAPI document.")},
            }
        },
    }
    components: dict[str, Any] = {
        "schemas": {
            **request_schemas(names),
            **COMPONENTS,
        }
    }
    if secured:
        components["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key from `auth.keys`."}
        }
    return copy.deepcopy(
        {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": "Phoenix Gateway",
                "version": package_version(),
                "description": "An OpenAI-compatible gateway in front of Ollama, OpenAI and Gemini backends.",
            },
            "tags": [
                {"name": "OpenAI", "description": "The OpenAI-compatible API."},
                {"name": "Operations", "description": "Health, readiness and metrics for operators."},
            ],
            "paths": paths,
            "components": components,
        }
    )


async def openapi_json(request: Request) -> Response:
    state = state_of(request.app)
    return json_response(document(state.config))
