"""The soak's rig and what it shows: the processes under test, started and stopped, and the readings
taken from them.

`start_rig` starts, each in its own session on a free loopback port, the fast mock
(`bench/mock_upstream.py`), a paced one, two instances of `bench/faulty_upstream.py` and the gateway
(`python -m gateway serve`) with a config written to the work directory; pinned with taskset, the
gateway on core 1 and everything else on core 0. `read_gateway` reads the gateway's processes in
/proc (VmRSS, VmHWM, descriptors, TCP connections per upstream and from clients, by matching the
socket inodes of `/proc/<pid>/fd` with `/proc/<pid>/net/tcp`); `gateway_view` scrapes its /metrics;
`scan_log` counts Tracebacks and error-level lines in its log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from procs import Proc, Processes, fetch, free_port, log, process_tree, status_kb, wait_http
from soak_client import CHUNKS, FAULT_BACKENDS, MAX_BODY, MODEL, SLOW_MODEL, Tally

BENCH = Path(__file__).resolve().parent
LOAD_CPU, GATEWAY_CPU, BOTH_CPUS = "0", "1", "0,1"
SLOW_DELAY_MS = "1-4"
SAMPLE_EVERY = 0.5


@dataclass
class Rig:
    procs: Processes
    gateway: Proc
    gateway_port: int
    upstreams: dict[int, str]  # port -> backend name
    refused: socket.socket  # bound, never listening: connecting to it is refused

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"


def write_config(path: Path, ports: dict[str, int]) -> None:
    url = "http://127.0.0.1:{}".format
    backends, faults = "", ""
    for backend, (names, timeouts) in FAULT_BACKENDS.items():
        limits = "{" + ", ".join(f"{k}: {v:g}" for k, v in timeouts.items()) + "}"
        backends += (
            f'  - {{name: {backend}, type: ollama, base_url: "{url(ports[backend])}", timeouts: {limits}}}\n'
        )
        faults += "".join(
            f'  - {{name: {n}, deployments: [{{backend: {backend}, model: "{n}"}}]}}\n' for n in names
        )
    path.write_text(f"""\
server: {{host: 127.0.0.1, max_body_bytes: {MAX_BODY}}}
backends:
  - {{name: mock, type: ollama, base_url: "{url(ports["mock"])}"}}
  - {{name: mock-slow, type: ollama, base_url: "{url(ports["mock-slow"])}"}}
{backends}models:
  - {{name: {MODEL}, deployments: [{{backend: mock, model: "{MODEL}"}}]}}
  - {{name: {SLOW_MODEL}, deployments: [{{backend: mock-slow, model: "{MODEL}"}}]}}
{faults}routing: {{retries: 0}}
""")


def start_rig(args: argparse.Namespace, workdir: Path, procs: Processes) -> Rig:
    python, mock, faulty = sys.executable, str(BENCH / "mock_upstream.py"), str(BENCH / "faulty_upstream.py")
    ports = {name: free_port() for name in ("mock", "mock-slow", "faulty", "stalling", "gateway")}
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    ports["refused"] = refused.getsockname()[1]
    chunks = ["--chunks", str(CHUNKS)]
    started = [
        procs.start("mock", [python, mock, "--port", str(ports["mock"]), *chunks], LOAD_CPU),
        procs.start(
            "mock-slow",
            [python, mock, "--port", str(ports["mock-slow"]), *chunks, "--delay-ms", SLOW_DELAY_MS],
            LOAD_CPU,
        ),
        *(
            procs.start(name, [python, faulty, "--port", str(ports[name])], LOAD_CPU)
            for name in ("faulty", "stalling")
        ),
    ]
    for proc in started:
        wait_http(proc, f"http://127.0.0.1:{ports[proc.name]}/api/version", 20)
    config = workdir / "gateway.yaml"
    write_config(config, ports)
    argv = [python, "-m", "gateway", "serve", "--config", str(config), "--port", str(ports["gateway"])]
    argv += ["--workers", str(args.workers), "--log-level", args.log_level]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    gateway = procs.start("gateway", argv, GATEWAY_CPU if args.workers == 1 else BOTH_CPUS, env)
    rig = Rig(procs, gateway, ports["gateway"], {ports[n]: n for n in ports if n != "gateway"}, refused)
    wait_http(gateway, rig.url + "/healthz", 60)
    if args.workers > 1:
        time.sleep(2)  # every worker up, not just the first to answer
    return rig


# ---- what /proc says about the gateway ----

TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def fd_targets(pid: int) -> list[str]:
    targets = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def tcp_sockets(pid: int) -> dict[str, tuple[int, int, str]]:
    """inode -> (local port, remote port, state), from the process's network namespace."""
    table = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
                cols = line.split()
                local, remote = int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)
                table[cols[9]] = (local, remote, TCP_STATES.get(cols[3], cols[3]))
    return table


@dataclass
class Reading:
    """The gateway's processes at one moment."""

    rss_kb: int
    hwm_kb: int
    fds: int
    connections: dict[str, dict[str, int]]  # upstream name, or "clients" -> TCP state -> count


def read_gateway(rig: Rig) -> Reading:
    pids = process_tree(rig.gateway.pid)
    sockets = tcp_sockets(rig.gateway.pid)
    connections: dict[str, Counter[str]] = {name: Counter() for name in rig.upstreams.values()}
    connections["clients"] = Counter()
    fds = 0
    for pid in pids:
        targets = fd_targets(pid)
        fds += len(targets)
        for target in targets:
            found = sockets.get(target.removeprefix("socket:[").removesuffix("]"))
            if found is None:
                continue
            local, remote, state = found
            if remote in rig.upstreams:
                connections[rig.upstreams[remote]][state] += 1
            elif local == rig.gateway_port and state != "LISTEN":
                connections["clients"][state] += 1
    return Reading(
        rss_kb=sum(status_kb(pid, "VmRSS") for pid in pids),
        hwm_kb=sum(status_kb(pid, "VmHWM") for pid in pids),
        fds=fds,
        connections={name: dict(states) for name, states in connections.items()},
    )


@dataclass(frozen=True, slots=True)
class Sample:
    seconds: float
    requests: int
    rss_kb: int
    fds: int


async def sample_forever(rig: Rig, tally: Tally, samples: list[Sample], started: float) -> None:
    pids, refreshed = process_tree(rig.gateway.pid), time.monotonic()
    last_log = started
    while True:
        now = time.monotonic()
        if now - refreshed > 10:
            pids, refreshed = process_tree(rig.gateway.pid), now
        rss = sum(status_kb(pid, "VmRSS") for pid in pids)
        samples.append(Sample(round(now - started, 2), tally.done, rss, fd_count(pids)))
        if now - last_log >= 10:
            last_log = now
            bad = sum(tally.unexpected.values())
            log(
                f"  {now - started:6.0f} s  {tally.done:>8,} requests  RSS {rss / 1024:6.1f} MB  "
                f"fds {samples[-1].fds:4}  unexpected {bad}"
            )
        await asyncio.sleep(SAMPLE_EVERY)


# ---- the gateway's own view ----

METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in fetch(url + "/metrics").decode().splitlines():
        match = METRIC_LINE.match(line)
        if match and not line.startswith("#"):
            samples.append((match[1], dict(LABEL.findall(match[2] or "")), float(match[3])))
    return samples


@dataclass
class GatewayView:
    inflight: dict[str, float]
    chat_statuses: dict[str, int]  # status -> requests the gateway counted on the chat endpoint
    upstream_errors: dict[str, int]  # "backend/reason" -> count

    @property
    def chat_total(self) -> int:
        return sum(self.chat_statuses.values())


def gateway_view(url: str) -> GatewayView:
    view = GatewayView({}, {}, {})
    for name, labels, value in scrape(url):
        if name == "gateway_inflight_requests":
            view.inflight[labels["backend"]] = value
        elif name == "gateway_requests_total" and labels.get("endpoint") == "chat":
            view.chat_statuses[labels["status"]] = view.chat_statuses.get(labels["status"], 0) + int(value)
        elif name == "gateway_upstream_errors_total":
            view.upstream_errors[f"{labels['backend']}/{labels['reason']}"] = int(value)
    return view


async def settle(rig: Rig, tally: Tally, limit: float = 15.0) -> tuple[GatewayView, float]:
    """Waits until nothing is in flight and every chat request sent is counted (or `limit` s)."""
    started = time.monotonic()
    while True:
        view = await asyncio.to_thread(gateway_view, rig.url)
        quiet = not any(view.inflight.values()) and view.chat_total >= tally.chat_posts
        if quiet or time.monotonic() - started > limit:
            return view, time.monotonic() - started
        await asyncio.sleep(0.2)


@dataclass
class LogScan:
    lines: int = 0
    tracebacks: int = 0
    errors: int = 0  # error-level lines: the gateway's own bugs ("internal error")
    warnings: int = 0
    examples: list[str] = field(default_factory=list)


def scan_log(path: Path) -> LogScan:
    scan = LogScan()
    with open(path, errors="replace") as lines:
        for line in lines:
            scan.lines += 1
            bad = "Traceback" in line
            scan.tracebacks += bad
            if '"level":"error"' in line or '"level":"critical"' in line or line.startswith("ERROR"):
                scan.errors += 1
                bad = True
            scan.warnings += '"level":"warning"' in line
            if bad and len(scan.examples) < 5:
                scan.examples.append(line.rstrip()[:400])
    return scan
