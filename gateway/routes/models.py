"""GET /v1/models and /v1/models/{id}: configured names, plus what each backend under a pattern lists.

With API keys configured, a caller sees only the models its key may use.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import allows
from gateway.config import ApiKey
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.policy import listed_name, not_found
from gateway.state import State, json_response, state_of


async def model_objects(state: State, key: ApiKey | None) -> dict[str, dict[str, Any]]:
    # Only pattern routes list what backends have: configured names need no backend to answer.
    listed = {d.backend for route in state.router.routes if route.is_pattern for d in route.deployments}
    inventory = await state.inventory(listed)
    objects: dict[str, dict[str, Any]] = {}
    for route in state.router.routes:
        if not route.is_pattern:
            owner = route.deployments[0].backend
            for name in (route.name, *route.aliases):
                objects[name] = {"id": name, "object": "model", "created": 0, "owned_by": owner}
            continue
        for deployment in route.deployments:
            for info in inventory.get(deployment.backend, []):
                public = state.router.public_name(route, info.id)
                if public is not None and public not in objects:
                    objects[public] = {
                        "id": public,
                        "object": "model",
                        "created": info.created,
                        "owned_by": info.owned_by,
                    }
    return {name: body for name, body in objects.items() if allows(key, name)}


async def list_models(request: Request) -> Response:
    state = state_of(request.app)
    exchange = state.begin(request.state.request_id, "models")
    try:
        objects = await model_objects(state, state.authenticate(request.headers, exchange))
    except Exception as error:
        return _failed(state, exchange, error)
    body = {"object": "list", "data": list(objects.values())}
    return json_response(body, after=lambda: state.finish(exchange, 200))


async def get_model(request: Request) -> Response:
    state = state_of(request.app)
    exchange = state.begin(request.state.request_id, "models")
    exchange.requested_model = model_id = request.path_params["model_id"]
    try:
        objects = await model_objects(state, state.authenticate(request.headers, exchange))
        name = listed_name(objects.keys(), model_id)  # Ollama's `llama3.2` is `llama3.2:latest`, as in chat
        if name is None:
            raise not_found(model_id, objects.keys())
    except Exception as error:
        return _failed(state, exchange, error)
    return json_response({**objects[name], "id": model_id}, after=lambda: state.finish(exchange, 200))


def _failed(state: State, exchange: Exchange, error: Exception) -> Response:
    """The error answer, recorded as the hot routes record theirs (RequestId adds the request id)."""
    if not isinstance(error, GatewayError):  # our own bug: logged where it happened
        state.unexpected(error)
        error = GatewayError(f"Internal error in the gateway (request {exchange.request_id}).")
    state.record_failure(exchange, error)
    return json_response(error.body(), error.http_status, error.headers)
