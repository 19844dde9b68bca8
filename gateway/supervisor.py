"""`serve --workers N`: uvicorn's process supervisor, with the gateway's reload.

uvicorn's `Multiprocess` answers SIGHUP by replacing every worker: each old one is stopped as at
shutdown, so its requests get `server.shutdown_timeout` to finish, and a new one that cannot
load the config dies with a traceback. Here SIGHUP is passed on to each worker instead, which
reloads in place as a single `serve` does (app.Reloader: requests in flight finish on the config
they started with, a config that does not load is logged as `config reload failed`). Workers
that die are still replaced, as uvicorn does.

SIGTERM and SIGINT stop it as they stop a single `serve` (README, Operations): the main process's
listening socket is closed at once (uvicorn kept it open, and the kernel queued connections on it
that nobody would take), the workers drain, and the caller re-raises the signal once they are gone.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from gateway.logs import get_logger

READY_TIMEOUT = 1.0  # seconds to wait for a starting worker's answer, as uvicorn's own readiness check


class Supervisor(Multiprocess):
    """uvicorn's `Multiprocess`, passing SIGHUP on to the workers."""

    def __init__(self, config: uvicorn.Config, sockets: list[Any]) -> None:
        super().__init__(config, sockets)
        # Workers owed a reload. One that has not finished starting has no SIGHUP handler yet
        # (the signal would end it): it gets the signal once it is ready.
        self._reload_due: list[Process] = []
        self.stopped_by: signal.Signals | None = None  # the signal that stopped the workers

    def handle_term(self) -> None:
        self._stop(signal.SIGTERM)

    def handle_int(self) -> None:
        self._stop(signal.SIGINT)

    def _stop(self, signum: signal.Signals) -> None:
        self.stopped_by = signum
        for sock in self.sockets:  # the workers close theirs as they start draining
            sock.close()
        self.should_exit.set()

    def handle_hup(self) -> None:
        get_logger().info("reloading the config in every worker", workers=len(self.processes))
        self._reload_due = list(self.processes)
        self._pass_on_reloads()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._pass_on_reloads()

    def _pass_on_reloads(self) -> None:
        due = []
        for process in self._reload_due:
            if process not in self.processes or not process.process.is_alive():
                continue  # gone; its replacement reads the file as it starts
            if process.is_ready(timeout=READY_TIMEOUT) and process.pid is not None:
                os.kill(process.pid, signal.SIGHUP)
            else:
                due.append(process)
        self._reload_due = due


def serve_workers(app: str, **options: Any) -> signal.Signals | None:
    """`uvicorn.run(app, **options)` with `workers` above 1, under the Supervisor; returns the
    signal that stopped the workers, for the caller to re-raise once it has cleaned up."""
    config = uvicorn.Config(app, **options)
    supervisor = Supervisor(config, sockets=[config.bind_socket()])
    supervisor.run()
    return supervisor.stopped_by
