"""create_app(config) -> the ASGI app: the route table, middleware, and a lifespan that owns the State.

The routes that carry the traffic (POST /v1/chat/completions, /v1/completions and /v1/embeddings)
go straight to their handlers (`HotRoutes`, the app's front, which also sets their request id); everything
else goes through the request-id middleware, Starlette's exception middleware and router. The
handlers turn every failure into an answer themselves, and Starlette's layers cost more per
request than the gateway's own routing did on the benchmark (bench/README.md). Each coroutine
layer is resumed every time a request's task is, so the hot routes have as few as can be."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from gateway.audit import AuditError
from gateway.config import Config, ConfigError
from gateway.errors import NoRoute
from gateway.incoming import Incoming
from gateway.metrics import forget_dead_workers, worker_exited
from gateway.middleware import ASGIApp, Receive, RequestId, Scope, Send
from gateway.openapi import openapi_json
from gateway.routes.chat import chat_completions
from gateway.routes.completions import completions
from gateway.routes.embeddings import embeddings
from gateway.routes.models import get_model, list_models
from gateway.routes.ops import healthz, metrics, readyz
from gateway.state import State, install, json_response, state_of
from gateway.sweep import Sweeper

DRAIN_SECONDS = 300.0  # how long a reload waits for the previous config's requests
# What the listening server and its shutdown were started with: a reload cannot change them.
RESTART_KEYS = ("host", "port", "shutdown_timeout")
# At shutdown, past server.shutdown_timeout uvicorn cancels the requests still running and goes on
# to stop the app: they get this long to send their last words (a 503, an SSE error) first.
LAST_WORDS_SECONDS = 2.0
ORPHAN_CHECK_SECONDS = 1.0  # how often a worker of `serve --workers N` checks its main process

Handler = Callable[[Incoming], Coroutine[Any, Any, Response]]
HOT_ROUTES: dict[str, Handler] = {
    "/v1/chat/completions": chat_completions,
    "/v1/completions": completions,
    "/v1/embeddings": embeddings,
}


def _starlette_endpoint(handler: Handler) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """The handler as a Starlette endpoint, for the route table (HotRoutes calls it directly)."""

    async def endpoint(request: Request) -> Response:
        return await handler(Incoming.from_scope(request.scope, request.receive))

    return endpoint


ROUTES = [
    *(Route(path, _starlette_endpoint(handler), methods=["POST"]) for path, handler in HOT_ROUTES.items()),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
]


API_ENDPOINTS = (
    "POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, GET /v1/models and"
    " GET /v1/models/{model}"
)


def _unknown_endpoint(method: str, path: str) -> str:
    """A 404's message. A client's base_url without its /v1 (or with it twice) is the usual cause,
    so when the path would be served with /v1 put right (or without a trailing slash), the message
    says which URL was meant; otherwise it lists what is served."""
    message = f"Unknown endpoint {method} {path}."
    bare = path.rstrip("/")
    while bare.startswith("/v1/v1/"):
        bare = bare[3:]
    meant = bare if bare.startswith("/v1/") else f"/v1{bare}"
    if _served(method, meant):
        if meant == path.rstrip("/"):
            return f"{message} Did you mean {method} {meant}, without the trailing slash?"
        return (
            f"{message} Did you mean {method} {meant}? The client's base_url should be the gateway's "
            "address followed by /v1, once."
        )
    return f"{message} This gateway serves {API_ENDPOINTS}."


def _served(method: str, path: str) -> bool:
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    return any(route.matches(scope)[0] is Match.FULL for route in ROUTES)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
    message = {
        404: _unknown_endpoint(request.method, request.url.path),
        405: f"Method {request.method} is not allowed on {request.url.path}.",
    }.get(exc.status_code, str(exc.detail))
    error = NoRoute(message, status=exc.status_code, code=kind, headers=dict(exc.headers or {}))
    state = state_of(request.app)
    # Recorded as any request; the label is one value, whatever the path (no new series per path).
    state.record_failure(state.begin(request.state.request_id, "other"), error)
    return json_response(error.body(), error.http_status, error.headers)


class Reloader:
    """Swaps the app's State for one built from a re-read config (SIGHUP), without dropping a
    request: new requests get the new State at once; those in flight keep the one they started
    with, which is retired when they have finished (or after `DRAIN_SECONDS`). A config that does
    not load or validate is logged and changes nothing. A new `server.log_level` is set through
    `set_log_level`, when the app may set it; the `server` keys of `RESTART_KEYS` are logged as
    needing a restart."""

    def __init__(
        self,
        app: Starlette,
        load: Callable[[], Config],
        environ: Mapping[str, str] | None,
        set_log_level: Callable[[str], object] | None = None,
    ) -> None:
        self.app = app
        self.load = load
        self.environ = environ
        self.set_log_level = set_log_level
        self.refresher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._lock = asyncio.Lock()

    @property
    def state(self) -> State:
        return state_of(self.app)

    def start(self) -> None:
        self.refresher = asyncio.create_task(self.state.keep_fresh())

    async def reload(self) -> None:
        async with self._lock:
            old = self.state
            level = old.config.server.log_level
            relevel = None
            try:
                config = self.load()
                # Before the new State is built, so that its logger has the new level.
                if self.set_log_level is not None and config.server.log_level != level:
                    relevel = self.set_log_level
                    relevel(config.server.log_level)
                new = old.successor(config, self.environ)
            except (ConfigError, AuditError) as error:
                if relevel is not None:
                    relevel(level)
                old.log.error("config reload failed; the running config stays", error=str(error))
                return
            install(self.app, new)
            self._log_what_stays(old.config, new)
            if self.refresher is not None:
                self.refresher.cancel()
            self.start()
            before, after = {b.name for b in old.config.backends}, {b.name for b in new.config.backends}
            new.log.info(
                "config reloaded",
                backends=len(after),
                added=sorted(after - before),
                removed=sorted(before - after),
                draining=old.active,
            )
            self._spawn(self._retire(old, new))

    def _log_what_stays(self, old: Config, new: State) -> None:
        server = new.config.server
        stays = [f"server.{key}" for key in RESTART_KEYS if getattr(server, key) != getattr(old.server, key)]
        if stays:
            new.log.warning("config reloaded, but these keys take effect only at a restart", keys=stays)
        if self.set_log_level is None and server.log_level != old.server.log_level:
            new.log.warning(
                "server.log_level is not applied: the level was set outside the file"
                " (--log-level or PHOENIX_LOG_LEVEL) and stays"
            )

    async def _retire(self, old: State, new: State) -> None:
        left = await old.retire(new, DRAIN_SECONDS)
        if left:
            new.log.warning("requests of the previous config still running after the drain", count=left)

    def on_hangup(self) -> None:
        self._spawn(self.reload())

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        """Run `work` in the background, holding a reference until it is done (or `stop`)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self.refresher is not None:
            self.refresher.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.state.aclose()


class HotRoutes:
    """The app's front. POSTs to the hot routes go straight to their handlers, with the request id
    set as RequestId would (their answers carry it in their own headers); the rest, and every
    other method on those paths (405), go through RequestId to Starlette."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.rest = RequestId(app, labelled=HOT_ROUTES)  # it also counts the hot routes' requests
        self.sweeper = Sweeper()  # a body that stops coming, a client that leaves a long request

    @property
    def running(self) -> int:
        """HTTP requests whose ASGI call has not returned."""
        return self.rest.running

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = HOT_ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.rest(scope, receive, send)
            return
        request_id, token = self.rest.begin(scope)
        try:
            scope["app"] = self.app  # as Starlette sets it
            request = Incoming.from_scope(scope, receive, request_id)
            self.sweeper.join(request)
            try:
                response = await handler(request)
            finally:
                self.sweeper.leave(request)
            await response(scope, receive, send)
        finally:
            self.rest.end(token)


def create_app(
    config: Config,
    environ: Mapping[str, str] | None = None,
    load: Callable[[], Config] | None = None,
    set_log_level: Callable[[str], object] | None = None,
    supervisor: int | None = None,
) -> ASGIApp:
    """The app for `config`. With `load`, SIGHUP re-reads the config through it (only where the
    app runs in the main thread, as under `phoenix-gateway serve`); with `set_log_level`, a
    reload that changes `server.log_level` applies it through that. `supervisor`: the pid of the
    main process of `serve --workers N`, whose worker this is: should it die, the worker stops."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        forget_dead_workers()
        reloader.start()
        hangup = load is not None and _handle_hangup(reloader.on_hangup)
        orphan_watch = asyncio.create_task(_stop_when_orphaned(supervisor, reloader)) if supervisor else None
        try:
            yield
        finally:
            if orphan_watch is not None:
                orphan_watch.cancel()
            until = asyncio.get_running_loop().time() + LAST_WORDS_SECONDS
            while front.running and asyncio.get_running_loop().time() < until:
                await asyncio.sleep(0.01)
            if hangup:  # from here to the exit, a SIGHUP would end the process by default
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            await reloader.stop()
            worker_exited(os.getpid())

    app = Starlette(routes=ROUTES, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    # No redirect to the path with(out) its slash: SDKs do not follow one for a POST; a JSON 404 says more.
    app.router.redirect_slashes = False
    install(app, State.build(config, environ))
    reloader = Reloader(app, load or (lambda: config), environ, set_log_level)
    front = HotRoutes(app)
    return front


async def _stop_when_orphaned(supervisor: int, reloader: Reloader) -> None:
    """A worker whose main process is gone (killed, so it could not stop its workers) stops as at
    SIGTERM, draining, instead of serving on with no one to pass it a reload, holding the port
    that a new `serve` needs."""
    while os.getppid() == supervisor:
        await asyncio.sleep(ORPHAN_CHECK_SECONDS)
    reloader.state.log.warning("the main process is gone: this worker stops", main_pid=supervisor)
    signal.raise_signal(signal.SIGTERM)


def _handle_hangup(callback: Callable[[], object]) -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, callback)
    return True
