"""phoenix-gateway: serve | check-config PATH | models | audit verify PATH."""

from __future__ import annotations

import argparse
import asyncio
import gc
import glob
import importlib.util
import ipaddress
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.audit import AuditError, AuditLog, format_report, verify
from gateway.auth import Keys
from gateway.config import Config, ConfigError, resolve_config
from gateway.logs import LOG_LEVELS, configure, configure_from_env, get_logger, stdlib_log_config
from gateway.metrics import MULTIPROC_ENV
from gateway.privacy import require_working_detector
from gateway.protocol import GatewayHttpProtocol
from gateway.state import State
from gateway.supervisor import serve_workers

# A signal disposition, as `signal.signal` returns it.
Hangup = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
APP = "gateway.cli:app_factory"  # what each uvicorn worker imports
GC_YOUNG_THRESHOLD = 20_000  # allocations between young-generation collections (default 700)


def routing_table(config: Config) -> str:
    """The resolved model -> deployment table that check-config prints."""
    rows = [("MODEL", "ALIASES", "BACKEND", "TYPE", "LOCAL", "UPSTREAM MODEL", "FALLBACKS")]
    for route in config.models:
        for i, deployment in enumerate(route.deployments):
            backend = config.backend(deployment.backend)
            upstream = deployment.model or ("(as requested)" if route.is_pattern else route.name)
            first = i == 0
            rows.append((
                route.name if first else "",
                ", ".join(route.aliases) if first else "",
                backend.name,
                backend.type,
                "yes" if backend.local else "no",
                upstream,
                ", ".join(route.fallbacks) if first else "",
            ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_log_level() -> str | None:
    """PHOENIX_LOG_LEVEL, checked as `--log-level` and `server.log_level` are."""
    level = os.environ.get("PHOENIX_LOG_LEVEL")
    if not level:
        return None
    if level.lower() not in LOG_LEVELS:
        raise ConfigError(
            f"environment: PHOENIX_LOG_LEVEL: expected debug, info, warning or error, got {level!r}"
        )
    return level.lower()


# A worker's exit status when the config does not load: not uvicorn's STARTUP_FAILURE (3), on
# which its supervisor stops every worker (gateway/supervisor.py).
WORKER_CANNOT_START = 4
SUPERVISOR_ENV = "PHOENIX_SUPERVISOR_PID"  # the main process of `serve --workers N`, for its workers
# A command whose reader left (`check-config FILE | head -1`): what a shell shows for any other
# command that SIGPIPE ended, 128 + 13.
BROKEN_PIPE = 141


def app_factory() -> object:
    """Entry point for uvicorn workers: each builds its app from PHOENIX_CONFIG or the environment.
    A worker started after the file was broken (one replacing a worker that died) cannot: it says
    so in one line and exits, and its replacement tries again."""
    try:
        config = resolve_config(None)
        pinned = _env_log_level()  # --log-level reaches the workers as PHOENIX_LOG_LEVEL
        configure(pinned or config.server.log_level)
        supervisor = os.environ.get(SUPERVISOR_ENV)
        app = create_app(
            config,
            load=lambda: resolve_config(None),
            set_log_level=None if pinned else configure,
            supervisor=int(supervisor) if supervisor else None,
        )
    except (ConfigError, AuditError) as error:
        configure_from_env()
        get_logger().error("worker cannot start: the config does not load", error=str(error))
        raise SystemExit(WORKER_CANNOT_START) from None
    # What start-up made (modules, config, pools) lives as long as the process: move it out of the
    # collector's sight, and let the young generation grow before a collection, since a request
    # allocates thousands of short-lived objects and holds no cycles worth chasing that often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    return app


def serve(args: argparse.Namespace) -> int:
    config = resolve_config(args.config)
    Keys(config.auth, os.environ)  # a key whose variable is unset stops the start, with its name
    require_working_detector(config.privacy)
    if config.privacy.audit_log:  # one it cannot open stops the start here, named, not in a worker
        AuditLog(config.privacy.audit_log).close()
    pinned = args.log_level or _env_log_level()  # else the file's, which a reload may change
    configure(pinned or config.server.log_level)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    log = get_logger()
    if not config.auth.keys and not _is_loopback(host):
        log.warning(
            "no API keys configured: the gateway is open to anyone who can reach it", host=host, port=port
        )
    limited = config.rate_limits.default.limiting
    limited = limited or any(key.limits and key.limits.limiting for key in config.auth.keys)
    if args.workers > 1 and limited and not config.rate_limits.redis_url:
        log.warning(
            "rate limits are kept per worker without rate_limits.redis_url: each of the workers"
            " admits the whole budget",
            workers=args.workers,
        )
    for backend in config.backends:
        if backend.api_key_env and not backend.api_key(os.environ):
            log.warning(
                "a backend's api_key_env is not set or empty: it is sent no API key",
                backend=backend.name,
                variable=backend.api_key_env,
            )
    if args.config:
        os.environ["PHOENIX_CONFIG"] = os.path.abspath(args.config)
    if pinned:
        os.environ["PHOENIX_LOG_LEVEL"] = pinned
    if args.workers > 1:  # each worker watches this process, to stop should it be killed
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
    else:
        os.environ.pop(SUPERVISOR_ENV, None)
    log.info("serving", host=host, port=port, workers=args.workers, backends=len(config.backends))
    options: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": args.workers,
        "access_log": False,
        "proxy_headers": False,  # nothing reads the client's address or scheme: skip that layer
        "loop": event_loop(),
        "http": GatewayHttpProtocol,
        "log_level": "warning",
        "log_config": stdlib_log_config(),  # uvicorn's lines are JSON too
        "timeout_graceful_shutdown": config.server.shutdown_timeout,
    }
    status = 0
    with metrics_directory(args.workers):
        if args.workers > 1:
            ended = serve_workers(APP, **options)
            stopped_by, status = (ended, 0) if isinstance(ended, signal.Signals) else (None, ended)
        else:
            stopped_by = None
            # uvicorn puts back the SIGINT handler it found and re-raises the signal it stopped
            # on: Python's handler would make Ctrl-C an exception and exit 0, not end by SIGINT.
            interrupt = signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                uvicorn.run(APP, **options)
            finally:
                signal.signal(signal.SIGINT, interrupt)
    if stopped_by is not None:  # as uvicorn ends a single worker: by the signal, 143 or 130 in a shell
        signal.signal(stopped_by, signal.SIG_DFL)
        signal.raise_signal(stopped_by)
    return status


def event_loop() -> str:
    """uvloop, taking every waiting connection in one turn (gateway/listen.py); where uvloop is
    not installed (Windows), uvicorn's choice, asyncio's loop."""
    return "gateway.listen:GatewayLoop" if importlib.util.find_spec("uvloop") else "auto"


@contextmanager
def metrics_directory(workers: int) -> Iterator[None]:
    """With several workers, the directory where each records its metrics: the operator's
    `PROMETHEUS_MULTIPROC_DIR` (emptied of a previous run's files, with one worker too), else a
    temporary one that is removed at exit."""
    given = os.environ.get(MULTIPROC_ENV)
    if workers < 2 and not given:
        yield
        return
    directory = given or tempfile.mkdtemp(prefix="phoenix-metrics-")
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, "*.db")):
        os.remove(stale)
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(directory, ignore_errors=True)


def check_config(args: argparse.Namespace) -> int:
    config = resolve_config(args.path)
    require_working_detector(config.privacy)  # what `serve` would refuse, this refuses too
    print(f"{args.path}: OK ({len(config.backends)} backends, {len(config.models)} models)")
    print(routing_table(config))
    return 0


def models(args: argparse.Namespace) -> int:
    config = resolve_config(args.config)
    configure(_env_log_level() or config.server.log_level)  # to stderr: stdout is the listing

    async def listing() -> int:
        """1 when a backend could not be listed (a script checking the backends sees it)."""
        state = State.build(config)
        try:
            listings = await asyncio.gather(*(state.listing(backend.name) for backend in config.backends))
        finally:
            await state.aclose()
        for backend, models in zip(config.backends, listings, strict=True):
            print(f"{backend.name} [{backend.type}, {'local' if backend.local else 'cloud'}]:")
            if models is None:
                print("  (unreachable: see the log line on stderr)")
                continue
            names = [m.id + (" (remote)" if m.remote else "") for m in models]
            print("\n".join(f"  {name}" for name in names) if names else "  (nothing listed)")
        return 1 if None in listings else 0

    return asyncio.run(listing())


def audit_verify(args: argparse.Namespace) -> int:
    try:
        report = verify(args.path)
    except AuditError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.ok else 1


def _whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: a whole number from `low` to `high` (inclusive)."""

    def parse(text: str) -> int:
        with suppress(ValueError):
            number = int(text)
            if number >= low and (high is None or number <= high):
                return number
        span = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {text!r}")

    return parse


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="phoenix-gateway", description="OpenAI-compatible LLM gateway.")
    sub = top.add_subparsers(dest="command")
    run = sub.add_parser("serve", help="serve the OpenAI-compatible API (the default)")
    run.add_argument("--config", help="YAML config file (default: $PHOENIX_CONFIG, else the environment)")
    run.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=_whole_number(1, 65535), help="port to listen on (default 8080)")
    run.add_argument("--workers", type=_whole_number(1), default=1, help="worker processes (default 1)")
    run.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS)  # as PHOENIX_LOG_LEVEL: any case
    run.set_defaults(func=serve)
    check = sub.add_parser("check-config", help="validate a config file and print its routing table")
    check.add_argument("path")
    check.set_defaults(func=check_config)
    listing = sub.add_parser("models", help="list what each backend serves")
    listing.add_argument("--config")
    listing.set_defaults(func=models)
    audit = sub.add_parser("audit", help="work with the hash-chained audit file")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    chain = audit_commands.add_parser("verify", help="check the audit file's chain and summarise it")
    chain.add_argument("path")
    chain.set_defaults(func=audit_verify)
    return top


def main(argv: Sequence[str] | None = None, *, hangup: Hangup = None) -> int:
    """The command line. `hangup`: SIGHUP's handler from before the launcher (gateway.__main__)
    held the signal off, put back for every command but `serve`, which installs its own."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    args = parser().parse_args(argv)
    if hangup is not None and args.func is not serve:
        signal.signal(signal.SIGHUP, hangup)
    try:
        result: int = args.func(args)
        sys.stdout.flush()  # here, where a reader that left is caught, rather than at exit
    except (ConfigError, AuditError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Nothing more can reach the reader, and it needs no traceback: stdout goes nowhere from
        # here on, so that Python's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    return result


if __name__ == "__main__":
    sys.exit(main())
