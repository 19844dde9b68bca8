"""POST /v1/chat/completions, streaming and not."""

from __future__ import annotations

import asyncio

from starlette.responses import Response

from gateway.body import read_json, validate, written
from gateway.errors import GatewayError
from gateway.eventstream import EventStream
from gateway.incoming import Incoming
from gateway.relay import UNREPORTED, StreamRelay, completion_body, notice_headers
from gateway.schemas import ChatRequest
from gateway.state import json_response


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
            relay = StreamRelay(
                source,
                exchange,
                model=exchange.answered_as,
                include_usage=chat.include_usage,
                finish=lambda status: state.finish(exchange, status),
                on_unexpected=state.unexpected,
                choices=chat.n or 1,
            )
            return EventStream(  # type: ignore[return-value]
                relay.body(),
                state.headers(exchange),
                on_client_gone=relay.client_gone,
                departure=departure,
                stalled=relay.client_stalled,
            )
        completion = await state.dispatcher.complete(plans, chat, exchange)
        if completion.counted:
            exchange.usage = completion.usage
        else:  # the client gets zeros; the books and the rate limiter do not take them for a count
            completion.notices["usage"] = UNREPORTED
        exchange.notes.update(completion.notices)
        headers = {**state.headers(exchange), **notice_headers(completion.notices)}
        body = completion_body(completion, model=exchange.answered_as)
        return json_response(body, headers=headers, after=lambda: state.finish(exchange, 200))
    except GatewayError as error:
        return state.fail(exchange, error, unread=not request.body_read)
    except asyncio.CancelledError:
        return state.cancelled(exchange, request)
    except Exception as error:
        return state.crash(exchange, error)
