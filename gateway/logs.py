"""structlog set-up and the audit line: one JSON line per request, never prompt or completion text."""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

AUDIT_EVENT = "request"
LOG_LEVELS = ("debug", "info", "warning", "error")
# Messages of uvicorn's that are expected, documented events, and the level they deserve: the
# shutdown deadline cutting requests (README, Operations) is no error of the gateway's.
DEMOTED = {"Cancel %s running task(s), timeout graceful shutdown exceeded": logging.WARNING}
# The request being served in this task: RequestId sets it, every log line of the request carries it.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("phoenix_request_id", default=None)


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time of writing (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _add_request_id(
    logger: Any, method_name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


def _dumps(event: dict[str, Any], **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


def configure(level: str = "info", *, stream: TextIO | None = None, json: bool | None = None) -> None:
    """JSON lines by default; human-readable console output when writing to a terminal."""
    if json is None:
        json = not (stream or sys.stderr).isatty()
    renderer: Any = structlog.processors.JSONRenderer(_dumps) if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            _add_request_id,  # one ContextVar, not structlog's copy of the whole context per line
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def configure_from_env() -> None:
    """The logs at PHOENIX_LOG_LEVEL's level, or at info when it names no level: for lines written
    before (or instead of) the app's start, which names a wrong level itself."""
    named = os.environ.get("PHOENIX_LOG_LEVEL", "").lower()
    configure(named if named in LOG_LEVELS else "info")


def get_logger(name: str = "gateway") -> Any:
    """A logger bound to the configuration in force now. (structlog's own `get_logger` gives a
    proxy that binds a new logger on every call, which showed in the profile of every request.)"""
    return structlog.get_logger(name).bind()


class StdlibHandler(logging.Handler):
    """Records of the standard library's loggers (uvicorn's: a start-up failure, the shutdown
    deadline; asyncio's) written as the gateway's own lines: JSON, at the gateway's level, and
    with an exception's type, never its stack trace. In a worker process uvicorn starts, a record
    may come before the app has set up the logs: they are set up then, as the app would."""

    def emit(self, record: logging.LogRecord) -> None:
        if not structlog.is_configured():
            configure_from_env()
        level = min(record.levelno, DEMOTED.get(str(record.msg), record.levelno))
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = type(record.exc_info[1]).__name__
        get_logger(record.name).log(level, record.getMessage(), **fields)


def stdlib_log_config() -> dict[str, Any]:
    """`logging.config.dictConfig` for uvicorn's `log_config`: its loggers and the root one (at
    warning and above; uvicorn sets its own levels after this) write through StdlibHandler."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"gateway": {"class": "gateway.logs.StdlibHandler"}},
        "loggers": {"uvicorn": {"handlers": ["gateway"], "level": "WARNING", "propagate": False}},
        "root": {"handlers": ["gateway"], "level": "WARNING"},
    }
