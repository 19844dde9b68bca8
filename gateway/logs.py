"""structlog set-up and the audit line: one JSON line per request, never prompt or completion text."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog

AUDIT_EVENT = "request"


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time of writing (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _dumps(event: dict[str, Any], **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


def configure(level: str = "info", *, stream: TextIO | None = None, json: bool | None = None) -> None:
    """JSON lines by default; human-readable console output when writing to a terminal."""
    if json is None:
        json = not (stream or sys.stderr).isatty()
    renderer: Any = structlog.processors.JSONRenderer(_dumps) if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "gateway") -> Any:
    return structlog.get_logger(name)
