"""The two ways a generation route answers, shared by chat and text completions: a stream relayed
as server-sent events, or one JSON body."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from gateway.eventstream import Departure, EventStream
from gateway.exchange import Exchange
from gateway.relay import UNREPORTED, Encoder, StreamRelay, StreamSource, notice_headers
from gateway.schemas import Completion
from gateway.state import State, json_response


def streamed(
    state: State,
    exchange: Exchange,
    source: StreamSource,
    departure: Departure,
    *,
    include_usage: bool,
    choices: int,
    encoder: Encoder | None = None,
) -> Response:
    """The opened `source` relayed to the client; the request is finished when the stream ends."""
    relay = StreamRelay(
        source,
        exchange,
        model=exchange.answered_as,
        include_usage=include_usage,
        finish=lambda status: state.finish(exchange, status),
        on_unexpected=state.unexpected,
        choices=choices,
        encoder=encoder,
    )
    return EventStream(  # type: ignore[return-value]
        relay.body(),
        state.headers(exchange),
        on_client_gone=relay.client_gone,
        departure=departure,
        stalled=relay.client_stalled,
    )


def answered(state: State, exchange: Exchange, completion: Completion, body: dict[str, Any]) -> Response:
    """`completion` answered as `body`, its usage booked (or marked unreported) and its notices in
    the headers; the request is finished once the answer has gone."""
    if completion.counted:
        exchange.usage = completion.usage
    else:  # the client gets zeros; the books and the rate limiter do not take them for a count
        completion.notices["usage"] = UNREPORTED
    exchange.notes.update(completion.notices)
    headers = {**state.headers(exchange), **notice_headers(completion.notices)}
    return json_response(body, headers=headers, after=lambda: state.finish(exchange, 200))
