"""POST /v1/embeddings: float vectors, or base64 of little-endian float32 as OpenAI encodes them."""

from __future__ import annotations

import asyncio
import base64
import struct
from dataclasses import replace

from starlette.responses import Response

from gateway.body import read_json, validate, written
from gateway.errors import GatewayError, InvalidRequest
from gateway.incoming import Incoming
from gateway.policy import Plan
from gateway.relay import UNREPORTED, notice_headers
from gateway.schemas import EmbeddingRequest, Usage
from gateway.state import State, json_response

# Backend types whose embedding call takes token ids: Ollama's /api/embed and Gemini's
# batchEmbedContents take text only.
TAKE_TOKEN_IDS = frozenset({"openai"})


def encode_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def for_token_ids(state: State, plans: list[Plan], model: str) -> list[Plan]:
    """The plans cut down to the targets that take token ids: the others would refuse them, so
    trying them would only cost a lease. A 400, before the request is charged, when none does."""
    kept: list[Plan] = []
    refusing: dict[str, str] = {}
    for plan in plans:
        targets = []
        for target in plan.targets:
            kind = state.config.backend(target.backend).type
            if kind in TAKE_TOKEN_IDS:
                targets.append(target)
            else:
                refusing[target.backend] = kind.capitalize()
        if targets:
            kept.append(replace(plan, targets=tuple(targets)))
    if not kept:
        where = ", ".join(f"{backend} ({kind})" for backend, kind in refusing.items())
        raise InvalidRequest(
            f"The model '{model}' is served by backends that take text input, not token arrays"
            f" ({where}); send 'input' as text (LangChain's OpenAIEmbeddings sends token arrays"
            " unless created with check_embedding_ctx_length=False).",
            param="input",
        )
    return kept


async def embeddings(request: Incoming) -> Response:
    state = request.state
    exchange = state.begin(request.request_id, "embeddings")
    try:
        key = state.authenticate(request.headers, exchange)
        data = await read_json(request, state.config.server.max_body_bytes)
        embed = validate(EmbeddingRequest, data)
        plans = await state.plans(
            request.headers,
            exchange,
            key=key,
            model=embed.model,
            metadata=embed.metadata,
            texts=lambda: written(data),
            token_ids=lambda: embed.token_ids() > 0,
        )
        if embed.token_ids():
            plans = for_token_ids(state, plans, embed.model)
        await state.admit(exchange, key, embed.texts(), embed.token_ids())
        result = await state.dispatcher.embed(plans, embed, exchange)  # as many vectors as inputs
        # Gemini counts no embedding tokens: zeros for the client, the estimate for the books
        notices = {} if result.counted else {"usage": UNREPORTED}
        if result.counted:
            exchange.usage = Usage(prompt_tokens=result.prompt_tokens)
        exchange.notes.update(notices)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode_base64(vector) if embed.encoding_format == "base64" else vector,
            }
            for i, vector in enumerate(result.vectors)
        ]
        body = {
            "object": "list",
            "data": data,
            "model": exchange.answered_as,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
        headers = {**state.headers(exchange), **notice_headers(notices)}
        return json_response(body, headers=headers, after=lambda: state.finish(exchange, 200))
    except GatewayError as error:
        return state.fail(exchange, error, unread=not request.body_read)
    except asyncio.CancelledError:
        return state.cancelled(exchange, request)
    except Exception as error:
        return state.crash(exchange, error)
