"""The processes a bench driver starts, and what it needs around them.

`Processes` starts each one in its own session from the repository root, optionally pinned with
taskset, its output in `<workdir>/<name>.log`; stopping one stops its whole process group (uvicorn's
workers with it): SIGTERM, then SIGKILL for whatever is left. `process_tree` and `status_kb` read
such a tree back from /proc. Around them: how a run ends (SIGTERM as Ctrl-C, a `Failure` as a
one-line error), a free loopback port, a GET that never goes through a proxy, a wait for a process
to answer, the line that says which machine and which revision of the gateway a run measured, how
steady the host keeps a core, the numbers wrk's report script prints, and a gateway config with
one mock Ollama behind "bench".
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Failure(Exception):
    """Stops the run with a message (no traceback)."""


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that SIGTERM unwinds like Ctrl-C, through every `finally`


@contextlib.contextmanager
def exit_on_failure() -> Iterator[None]:
    """Ends the program with a line, not a traceback: status 1 on a Failure, 130 on an interrupt.

    Wrap only the run, whose own `finally` has stopped every process by the time this speaks.
    """
    try:
        yield
    except Failure as exc:
        log(f"error: {exc}")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        log("interrupted; every process this run started has been stopped")
        raise SystemExit(130) from None


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Processes:
    """Everything a driver starts, each in its own session so that a whole tree can be stopped.

    With `pin`, a process started with `cpus` runs under `taskset -c cpus`; without, or with
    `cpus=None`, it runs wherever the scheduler puts it.
    """

    def __init__(self, workdir: Path, pin: bool = True) -> None:
        self.workdir = workdir
        self.pin = pin
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cpus: str | None,
        env: dict[str, str] | None = None,
        cwd: str | Path = ROOT,
    ) -> Proc:
        # taskset execs the command: the pid (and so the process group) stays the same
        command = ["taskset", "-c", cpus, *argv] if self.pin and cpus else list(argv)
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                os.killpg(proc.pid, signal.SIGCONT)  # in case it was paused
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # stragglers in the group (uvicorn workers)
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree += children
        frontier += children
    return tree


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The CPU time `pid` has used, in user and kernel mode (utime + stime from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kb(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fetch(url: str, timeout: float = 5.0) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    with opener.open(url, timeout=timeout) as response:
        data: bytes = response.read()
        return data


def wait_http(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise Failure(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError):  # refused, reset, timed out or an HTTP error status
            fetch(url, timeout=2)
            return
        time.sleep(0.1)
    raise Failure(f"{proc.name} did not answer {url} within {timeout:.0f} s:\n{proc.tail()}")


def describe_machine() -> str:
    """The CPU, the Python, the time, and the gateway's revision (marked if gateway/ has changes)."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rev = "unknown revision"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        status = [*git, "status", "--porcelain", "--", "gateway"]
        dirty = subprocess.run(status, capture_output=True, text=True, check=False)
        rev = head.stdout.strip() + (" + uncommitted changes in gateway/" if dirty.stdout.strip() else "")
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {now}; gateway at {rev}"


# Fixed work, timed per second: JSON in and out of a small chat body, as a gateway does.
STEADINESS_PROBE = """
import json, sys, time
seconds = int(sys.argv[1])
doc = {"model": "bench", "messages": [{"role": "user", "content": "Why is the sky blue?"}] * 4}
counts, count = [], 0
mark = time.perf_counter() + 1
while len(counts) < seconds:
    for _ in range(100):
        json.loads(json.dumps(doc))
    count += 100
    if time.perf_counter() >= mark:
        counts.append(count)
        count, mark = 0, mark + 1
print(" ".join(map(str, counts)))
"""


def steadiness(cpu: str, seconds: int) -> list[float]:
    """How steady the host keeps one core: the same CPU work done in each of `seconds` seconds on
    `cpu`, as a share of the best second (1.0 for all on a steady machine). On the project's
    virtual machine, seconds down to about 0.55 came with no steal time counted."""
    command = ["taskset", "-c", cpu, sys.executable, "-c", STEADINESS_PROBE, str(seconds)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True)
        counts = [int(n) for n in done.stdout.split()]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise Failure(f"the steadiness probe failed: {exc}") from exc
    best = max(counts, default=0)
    return [count / best for count in counts] if best else []


WRK_ERRORS = ("connect", "read", "write", "status", "timeout")


def wrk_report(output: str, returncode: int, url: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The numbers `bench/wrk/report.lua` prints on its WRK_RESULT line, and the errors among them."""
    line = next((x for x in output.splitlines() if x.startswith("WRK_RESULT ")), None)
    if returncode != 0 or line is None:
        raise Failure(f"wrk failed on {url} (exit {returncode}):\n{output}")
    data: dict[str, Any] = json.loads(line.removeprefix("WRK_RESULT "))
    return data, {name: int(data[name]) for name in WRK_ERRORS if data[name]}


def one_mock_config(mock_port: int, openai: bool = False) -> str:
    """A gateway config: the model "bench" on the mock at `mock_port`, as an Ollama (native API)
    or, with `openai`, as an OpenAI-compatible server (its /v1)."""
    if openai:
        backend = f'{{name: mock, type: openai, base_url: "http://127.0.0.1:{mock_port}/v1"}}'
        model = "gpt-mock"
    else:
        backend = f'{{name: mock, type: ollama, base_url: "http://127.0.0.1:{mock_port}"}}'
        model = "llama3.2:latest"
    route = f'{{name: bench, deployments: [{{backend: mock, model: "{model}"}}]}}'
    return f"backends:\n  - {backend}\nmodels:\n  - {route}\n"
