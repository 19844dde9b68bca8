"""`serve --workers N`: uvicorn's process supervisor, with the gateway's reload.

uvicorn's `Multiprocess` answers SIGHUP by replacing every worker: each old one is stopped as at
shutdown, so its requests get `server.shutdown_timeout` to finish, and a new one that cannot
load the config dies with a traceback. Here SIGHUP is passed on to each worker instead, which
reloads in place as a single `serve` does (app.Reloader: requests in flight finish on the config
they started with, a config that does not load is logged as `config reload failed`). Workers
that die are still replaced, as uvicorn does.
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


def serve_workers(app: str, **options: Any) -> None:
    """`uvicorn.run(app, **options)` with `workers` above 1, under the Supervisor."""
    config = uvicorn.Config(app, **options)
    Supervisor(config, sockets=[config.bind_socket()]).run()
