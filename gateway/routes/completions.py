"""POST /v1/completions, OpenAI's legacy text completions, streaming and not, served as chat
(gateway/legacy.py) through the same steps as POST /v1/chat/completions."""

from __future__ import annotations

import asyncio

from starlette.responses import Response

from gateway.body import read_json, validate, written
from gateway.errors import GatewayError
from gateway.incoming import Incoming
from gateway.legacy import (
    TextEncoder,
    about_prompt,
    chat_requests,
    check,
    complete_all,
    joined,
    open_all,
    text_completion_body,
)
from gateway.routes.answer import answered, streamed
from gateway.schemas import ChatRequest, CompletionRequest


async def completions(request: Incoming) -> Response:
    state = request.state
    exchange = state.begin(request.request_id, "completions")
    chats: list[ChatRequest] = []  # once there are, an error about their messages is about the prompt
    try:
        key = state.authenticate(request.headers, exchange)
        data = await read_json(request, state.config.server.max_body_bytes)
        legacy = validate(CompletionRequest, data)
        check(legacy, data)
        chats = chat_requests(legacy, data)
        exchange.stream = bool(legacy.stream)
        if state.config.routing.affinity == "prefix":
            exchange.affinity = f"{exchange.key_name}|{chats[0].conversation()}"
        plans = await state.plans(
            request.headers,
            exchange,
            key=key,
            model=legacy.model,
            metadata=legacy.metadata,
            texts=lambda: written(data),
        )
        await state.admit(exchange, key, legacy.prompts, legacy.answer_tokens)
        n = legacy.n or 1
        if legacy.stream:
            departure = request.watch()
            try:
                source = await open_all(state.dispatcher, plans, chats, exchange, n)
            except BaseException:
                departure.stop()
                raise
            encoder = TextEncoder(legacy, exchange.answered_as)
            return streamed(
                state,
                exchange,
                source,
                departure,
                include_usage=legacy.include_usage,
                choices=legacy.choices,
                encoder=encoder,
            )
        completion = joined(await complete_all(state.dispatcher, plans, chats, exchange), n)
        body = text_completion_body(completion, legacy, model=exchange.answered_as)
        return answered(state, exchange, completion, body)
    except GatewayError as error:
        return state.fail(exchange, about_prompt(error) if chats else error, unread=not request.body_read)
    except asyncio.CancelledError:
        return state.cancelled(exchange, request)
    except Exception as error:
        return state.crash(exchange, error)
