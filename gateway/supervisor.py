"""`serve --workers N`: uvicorn's process supervisor, with the gateway's reload.

uvicorn's `Multiprocess` answers SIGHUP by replacing every worker: each old one is stopped as at
shutdown, so its requests get `server.shutdown_timeout` to finish, and a new one that cannot
load the config dies with a traceback. Here SIGHUP is passed on to each worker instead, which
reloads in place as a single `serve` does (app.Reloader: requests in flight finish on the config
they started with, a config that does not load is logged as `config reload failed`). Workers
that die are replaced, as uvicorn does, but one that exits by itself soon after it started (the
file it reads at start is broken) is replaced after a pause that doubles each time, up to
`MAX_RESTART_PAUSE`, while the other workers serve on: not as soon as it is seen gone, a Python
start-up's worth of CPU and a log line every second or two for as long as the file stays broken.
When no worker is left serving, every one having failed to start, the gateway stops (exit status
1) rather than leave connections waiting in the listening socket's queue for no one.
uvicorn stops everything when a worker exits with its STARTUP_FAILURE status (3): the gateway's
own "cannot start" status is another (cli.WORKER_CANNOT_START), and when uvicorn's does stop the
workers, `serve` exits 1, not 0.

SIGTERM and SIGINT stop it as they stop a single `serve` (README, Operations): the main process's
listening socket is closed at once (uvicorn kept it open, and the kernel queued connections on it
that nobody would take), the workers drain, and the caller re-raises the signal once they are gone.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from gateway.logs import get_logger

READY_TIMEOUT = 1.0  # seconds to wait for a starting worker's answer, as uvicorn's own readiness check
STEADY_SECONDS = 10.0  # a worker that exits sooner after it started counts as failing to start
FIRST_RESTART_PAUSE = 0.5  # seconds before replacing a worker that failed to start; doubles each time
MAX_RESTART_PAUSE = 30.0


class Supervisor(Multiprocess):
    """uvicorn's `Multiprocess`, passing SIGHUP on to the workers."""

    def __init__(self, config: uvicorn.Config, sockets: list[Any]) -> None:
        super().__init__(config, sockets)
        # Workers owed a reload. One that has not finished starting has no SIGHUP handler yet
        # (the signal would end it): it gets the signal once it is ready.
        self._reload_due: list[Process] = []
        self.stopped_by: signal.Signals | None = None  # the signal that stopped the workers
        self.failed = False  # a worker's start-up failed as uvicorn sees it (STARTUP_FAILURE)
        self._born: dict[Process, float] = {}  # when each worker was started (first seen)
        self._failed_starts: dict[int, int] = {}  # by slot: workers in a row that died young
        self._restart_at: dict[int, float] = {}  # by slot: when its dead worker is replaced

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
        """uvicorn's, with a growing pause before replacing a worker that died young."""
        if self.should_exit.is_set():
            return
        now = time.monotonic()
        for slot, process in enumerate(self.processes):
            if slot in self._restart_at:  # its worker is dead, its replacement due then
                if now >= self._restart_at[slot]:
                    del self._restart_at[slot]
                    self._replace(slot)
                continue
            born = self._born.setdefault(process, now)
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                if now - born >= STEADY_SECONDS:
                    self._failed_starts.pop(slot, None)
                continue
            process.kill()  # hung, or gone already
            process.join()
            self._born.pop(process, None)
            if process.exitcode == STARTUP_FAILURE:  # uvicorn's: the app cannot be made at all
                get_logger().error("a worker failed to start; stopping", pid=process.pid)
                self.failed = True
                self.should_exit.set()
                return
            if now - born >= STEADY_SECONDS or process.exitcode is None or process.exitcode < 0:
                self._replace(slot)  # it had served, or a signal ended it (an OOM kill)
                continue
            failures = self._failed_starts[slot] = self._failed_starts.get(slot, 0) + 1
            pause = min(FIRST_RESTART_PAUSE * 2 ** (failures - 1), MAX_RESTART_PAUSE)
            get_logger().warning(
                "a worker exited soon after it started; replacing it after a pause",
                pid=process.pid,
                exit_status=process.exitcode,
                pause=pause,
            )
            self._restart_at[slot] = now + pause
        if len(self._restart_at) == len(self.processes):  # none serves, and none can start
            get_logger().error("no worker can start; stopping", workers=len(self.processes))
            self.failed = True
            self.should_exit.set()
            return
        self._pass_on_reloads()

    def handle_ttou(self) -> None:
        super().handle_ttou()  # one worker fewer: the last slot goes, and what was due for it
        for slot in [slot for slot in self._restart_at if slot >= len(self.processes)]:
            del self._restart_at[slot]
            self._failed_starts.pop(slot, None)

    def _replace(self, slot: int) -> None:
        process = Process(self.config, self.sockets)
        process.start()
        self.processes[slot] = process
        self._born[process] = time.monotonic()

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


def serve_workers(app: str, **options: Any) -> signal.Signals | int:
    """`uvicorn.run(app, **options)` with `workers` above 1, under the Supervisor; returns the
    signal that stopped the workers, for the caller to re-raise once it has cleaned up, else the
    exit status: 1 when a worker's start-up failure stopped them."""
    config = uvicorn.Config(app, **options)
    supervisor = Supervisor(config, sockets=[config.bind_socket()])
    supervisor.run()
    return supervisor.stopped_by or (1 if supervisor.failed else 0)
