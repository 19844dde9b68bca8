"""POST /v1/chat/completions, streaming and not."""

from __future__ import annotations

import asyncio

from starlette.responses import Response

from gateway.body import read_json, validate, written
from gateway.errors import GatewayError
from gateway.incoming import Incoming
from gateway.relay import completion_body
from gateway.routes.answer import answered, streamed
from gateway.schemas import ChatRequest


async def chat_completions(request: Incoming) -> Response:
    state = request.state
    exchange = state.begin(request.request_id, "chat")
    try:
        key = state.authenticate(request.headers, exchange)
        data = await read_json(request, state.config.server.max_body_bytes)
        chat = validate(ChatRequest, data)
        exchange.stream = bool(chat.stream)
        if state.config.routing.affinity == "prefix":
            exchange.affinity = f"{exchange.key_name}|{chat.conversation()}"
        plans = await state.plans(
            request.headers,
            exchange,
            key=key,
            model=chat.model,
            metadata=chat.metadata,
            texts=lambda: written(data),
            attachments=chat.has_attachments,
        )
        await state.admit(exchange, key, chat.texts(), chat.max_answer_tokens)
        if chat.stream:
            departure = request.watch()
            try:
                source = await state.dispatcher.open_stream(plans, chat, exchange)
            except BaseException:
                departure.stop()
                raise
            return streamed(
                state, exchange, source, departure, include_usage=chat.include_usage, choices=chat.n or 1
            )
        completion = await state.dispatcher.complete(plans, chat, exchange)
        return answered(state, exchange, completion, completion_body(completion, model=exchange.answered_as))
    except GatewayError as error:
        return state.fail(exchange, error, unread=not request.body_read)
    except asyncio.CancelledError:
        return state.cancelled(exchange, request)
    except Exception as error:
        return state.crash(exchange, error)
