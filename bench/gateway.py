"""What the gateway adds, measured against going direct to a zero-latency mock upstream.

Starts `bench/mock_upstream.py` (a fast one, and one that paces its tokens) and the gateway
(`python -m gateway serve`) as their own processes, pinned with taskset: the load generator (wrk),
the mocks and this driver on core 0, the gateway on core 1. Each round runs every scenario on every
path, alternating the order (direct first in odd rounds, last in even ones), after a warm-up:

- non-streaming chat at 64 connections: req/s, p50, p99;
- streaming chat (`--chunks` content pieces, 20 by default) at 64 connections: streams/s;
- non-streaming at one connection: p50, p99, and what the gateway adds to them;
- non-streaming at fixed offered rates (`--rate`, 3,000, 4,000 and 5,000 req/s) over 64
  connections: the latency at each load rather than at saturation, how many requests left behind
  their schedule, and the highest of those loads at which the p99 stays under 10 ms;
- time to the first content chunk, sequential streams from a raw-socket client, paired;
- a paced upstream (tokens every `--paced-delay` ms) at 16 and 256 concurrent streams: total time.

The paths: direct to the mock's Ollama `/api/chat`, through the gateway (OpenAI in, Ollama NDJSON
translated to SSE), direct to the mock's OpenAI `/v1/chat/completions`, through the gateway to it
(`type: openai`), and with `--peers` LiteLLM's proxy in front of the same Ollama mock. The tables
give medians over rounds; "added" is paired within a round (gateway minus direct).

    .venv/bin/python bench/gateway.py --quick                 # smoke run, about 2 minutes
    .venv/bin/python bench/gateway.py [--rounds 3] [--duration 5] [--workers 1,2] [--peers]
    .venv/bin/python bench/gateway.py --memory 200000         # RSS over many requests

wrk comes from apt when missing. LiteLLM (`--peers`) is looked for in `--litellm-venv` (default
`.venv-litellm`: `python -m venv .venv-litellm && .venv-litellm/bin/pip install 'litellm[proxy]'`).
Loopback only; every run is bounded by --duration and every loop by a count and a time limit.
A wrk run with error answers (not 2xx/3xx), socket errors or timeouts marks its rows with ⚠, fails
the targets it feeds and makes the script exit with status 1 after the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WRK_DIR = BENCH / "wrk"
sys.path.insert(0, str(BENCH))

from mock_upstream import WORDS, parse_delay  # noqa: E402
from procs import (  # noqa: E402
    Failure,
    Proc,
    Processes,
    cpu_seconds,
    describe_machine,
    exit_on_failure,
    free_port,
    log,
    on_sigterm,
    process_tree,
    status_kb,
    steadiness,
    wait_http,
    wrk_report,
)

LOAD_CPU, GATEWAY_CPU, BOTH_CPUS = "0", "1", "0,1"
PROMPT = "Why is the sky blue?"  # the wrk scripts send the same
UPSTREAM_MODEL = "llama3.2"
OPENAI_MODEL = "gpt-mock"
SCENARIOS = ("nonstream", "stream", "latency", "rate", "ttft", "paced")
# Paced runs: (streams, staggered). A staggered run starts each connection's first stream at a
# random moment within one stream's expected length, as independent users' streams start, and so
# measures 256 streams in flight; the run without it opens all 256 in the same millisecond and
# measures that burst, which is mostly the CPU of 256 openings queued one behind the other.
PACED_RUNS = ((16, True), (256, True), (256, False))
MAX_ROUNDS, MAX_DURATION, MAX_TTFT_STREAMS, MAX_MEMORY_REQUESTS = 20, 60, 5000, 2_000_000
TARGETS = {"rps": 5000.0, "p99_ms": 10.0, "streams": 1500.0, "added_p50_ms": 0.3, "added_p99_ms": 1.0}


# ---- processes ----


def rss_kb(pid: int) -> int:
    """VmRSS of `pid` and all its descendants (uvicorn's workers), in kB."""
    return sum(status_kb(member, "VmRSS") for member in process_tree(pid))


# ---- wrk ----


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    sudo = ["sudo"] if os.geteuid() != 0 and shutil.which("sudo") else []
    command = [*sudo, "apt-get", "install", "-y", "wrk"]
    log(f"wrk not found; installing it: {' '.join(command)}")

    def apt(argv: list[str]) -> None:  # its output on stderr: stdout is the report's
        subprocess.run(argv, check=True, timeout=300, stdout=sys.stderr)

    try:
        try:
            apt(command)
        except subprocess.CalledProcessError:
            # a fresh Debian image (the python ones included) has no package lists until an update
            log("apt-get could not install wrk; updating its package lists and trying again")
            apt([*sudo, "apt-get", "update"])
            apt(command)
    except (OSError, subprocess.SubprocessError) as exc:
        raise Failure(
            f"wrk is missing and `{' '.join(command)}` failed ({exc}); install wrk and retry"
        ) from exc
    found = shutil.which("wrk")
    if not found:
        raise Failure("apt-get finished but wrk is still not on PATH")
    return found


@dataclass
class WrkResult:
    requests: int
    rps: float
    mean_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    errors: dict[str, int]
    paced_ms: float | None = None  # mean token pacing of the streams the paced mock completed
    late: int = 0  # with a rate: requests sent more than 1 ms after they were due (report.lua `pace`)
    cpu_us: float | None = None  # through the gateway: its CPU (every process of it) per request

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


ERROR_MARK = " ⚠"  # after a figure or row taken from wrk runs that had error answers


def erred(*runs: Sequence[WrkResult]) -> bool:
    """Whether any of these runs had an answer that was not 2xx/3xx, a socket error or a timeout."""
    return any(r.error_count for group in runs for r in group)


@dataclass(frozen=True)
class Endpoint:
    key: str  # e.g. "gateway-ollama"
    label: str  # its row in the tables
    via: str  # direct | gateway | litellm
    base: str  # http://127.0.0.1:port
    path: str  # /api/chat or /v1/chat/completions
    model: str
    direct: str  # the key of the direct endpoint it is compared with

    @property
    def native(self) -> bool:
        return self.path == "/api/chat"

    @property
    def url(self) -> str:
        return self.base + self.path

    def script(self) -> Path:
        return WRK_DIR / ("ollama_chat.lua" if self.native else "openai_chat.lua")

    def body(self, stream: bool) -> bytes:
        messages = [{"role": "user", "content": PROMPT}]
        return json.dumps({"model": self.model, "stream": stream, "messages": messages}).encode()


def paced_scenario(connections: int, staggered: bool) -> str:
    return f"paced{connections}" if staggered else f"paced{connections}-at-once"


def run_wrk(
    wrk: str,
    endpoint: Endpoint,
    *,
    stream: bool,
    connections: int,
    duration: float,
    stagger_ms: int = 0,
    rate: int = 0,
) -> WrkResult:
    command = [
        "taskset",
        "-c",
        LOAD_CPU,
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",  # wrk takes whole seconds
        "--timeout",
        "10s",
        "-s",
        str(endpoint.script()),
        endpoint.url,
        "--",
        "true" if stream else "false",
        endpoint.model,
    ]
    if stagger_ms or rate:
        command += [str(stagger_ms), str(connections), str(rate)]
    popen = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = popen.communicate(timeout=duration + 30)
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
    data, errors = wrk_report(out.decode(errors="replace"), popen.returncode, endpoint.url)
    done = int(data["requests"])

    def latency(name: str) -> float:  # NaN when nothing completed
        return float(data[name]) if done else float("nan")

    return WrkResult(
        requests=done,
        rps=float(data["rps"]),
        mean_us=latency("mean_us"),
        p50_us=latency("p50_us"),
        p90_us=latency("p90_us"),
        p99_us=latency("p99_us"),
        max_us=latency("max_us"),
        errors=errors,
        late=int(data["late"]),
    )


# ---- a raw-socket client for the time to first content ----


def ollama_content(line: bytes) -> bool:
    if not line.strip():
        return False
    message = json.loads(line).get("message") or {}
    return bool(message.get("content"))


def sse_content(line: bytes) -> bool:
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
        return False
    choices = json.loads(line[6:]).get("choices") or []
    return bool(choices and (choices[0].get("delta") or {}).get("content"))


class StreamClient:
    """One keep-alive HTTP/1.1 connection that times a stream's first content line."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        host, port = endpoint.base.removeprefix("http://").rsplit(":", 1)
        self.address = (host, int(port))
        body = endpoint.body(stream=True)
        self.request = (
            f"POST {endpoint.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.is_content = ollama_content if endpoint.native else sse_content
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=10)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.sock

    def ttft(self) -> float:
        """Seconds from sending the request to reading the first content line; reads the whole stream."""
        sock = self.connect()
        started = time.perf_counter()
        sock.sendall(self.request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.recv(sock)
        head, buf = buf.split(b"\r\n\r\n", 1)
        status = head.split(b" ", 2)[1]
        if status != b"200" or b"transfer-encoding: chunked" not in head.lower():
            self.close()
            raise Failure(f"{self.endpoint.label}: unexpected stream answer: {head.decode(errors='replace')}")
        first: float | None = None
        pending = b""
        while True:
            eol = buf.find(b"\r\n")
            size = int(buf[:eol].split(b";")[0], 16) if eol >= 0 else -1
            if size < 0 or len(buf) < eol + 4 + size:
                buf += self.recv(sock)
                continue
            data, buf = buf[eol + 2 : eol + 2 + size], buf[eol + 4 + size :]
            if size == 0:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            if first is None:
                for line in lines:
                    if self.is_content(line):
                        first = time.perf_counter()
                        break
        if first is None:
            raise Failure(f"{self.endpoint.label}: a stream ended without content")
        if b"connection: close" in head.lower():
            self.close()
        return first - started

    def recv(self, sock: socket.socket) -> bytes:
        data = sock.recv(65536)
        if not data:
            self.close()
            raise Failure(f"{self.endpoint.label}: the connection closed mid-answer")
        return data


# ---- results ----


@dataclass
class Results:
    wrk: dict[str, dict[str, list[WrkResult]]] = field(default_factory=dict)  # scenario -> endpoint -> rounds
    ttft: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # endpoint -> [(p50, p99) s]
    rss_kb: dict[str, int] = field(default_factory=dict)
    workers: dict[int, dict[str, list[WrkResult]]] = field(default_factory=dict)  # extra worker counts
    memory: list[tuple[int, float, int]] = field(default_factory=list)  # (requests so far, seconds, kB)
    memory_runs: list[WrkResult] = field(default_factory=list)  # the memory soak's wrk runs
    notes: list[str] = field(default_factory=list)
    # every wrk run (warm-up and memory soak included) that had errors: what it was, and how many
    error_runs: list[str] = field(default_factory=list)
    load_before: float = 0.0  # 1-minute load average when the run began: other work on the machine
    # the gateway's core, before and after the run: fixed work per second, as a share of the best
    steadiness: dict[str, list[float]] = field(default_factory=dict)

    def add(self, scenario: str, key: str, result: WrkResult) -> None:
        self.wrk.setdefault(scenario, {}).setdefault(key, []).append(result)

    def runs(self, scenario: str, key: str) -> list[WrkResult]:
        return self.wrk.get(scenario, {}).get(key, [])


def median(values: Sequence[float]) -> float:
    """The median of the values that are numbers (a run that completed nothing has NaN latencies)."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# ---- the bench ----


@dataclass
class Bench:
    args: argparse.Namespace
    procs: Processes
    wrk: str
    results: Results = field(default_factory=Results)
    endpoints: list[Endpoint] = field(default_factory=list)  # zero-latency paths
    paced: list[Endpoint] = field(default_factory=list)
    mock_url: str = ""
    paced_url: str = ""
    gateway: Proc | None = None
    litellm: Proc | None = None  # paused (SIGSTOP) except while its own runs go, so it never steals CPU
    gateway_url: str = ""
    gateway_pids: list[int] = field(default_factory=list)  # uvicorn's and its workers'
    config_path: Path | None = None
    litellm_url: str | None = None
    machine: str = ""  # the CPU, the revision and the gateway's Python, taken at the start

    # -- setup --

    def start_mocks(self) -> None:
        python = sys.executable
        mock = str(BENCH / "mock_upstream.py")
        chunks = str(self.args.chunks)
        port, paced_port = free_port(), free_port()
        fast = self.procs.start("mock", [python, mock, "--port", str(port), "--chunks", chunks], LOAD_CPU)
        paced = self.procs.start(
            "mock-paced",
            [
                python,
                mock,
                "--port",
                str(paced_port),
                "--chunks",
                chunks,
                "--delay-ms",
                self.args.paced_delay,
            ],
            LOAD_CPU,
        )
        self.mock_url, self.paced_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{paced_port}"
        wait_http(fast, self.mock_url + "/api/version", 20)
        wait_http(paced, self.paced_url + "/api/version", 20)

    def write_config(self, workdir: Path) -> None:
        text = f"""\
server: {{host: 127.0.0.1, log_level: warning}}
backends:
  - {{name: mock-ollama, type: ollama, base_url: "{self.mock_url}"}}
  - {{name: mock-openai, type: openai, base_url: "{self.mock_url}/v1"}}
  - {{name: mock-paced, type: ollama, base_url: "{self.paced_url}"}}
models:
  - {{name: bench, deployments: [{{backend: mock-ollama, model: "{UPSTREAM_MODEL}"}}]}}
  - {{name: bench-openai, deployments: [{{backend: mock-openai, model: "{OPENAI_MODEL}"}}]}}
  - {{name: bench-paced, deployments: [{{backend: mock-paced, model: "{UPSTREAM_MODEL}"}}]}}
"""
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(text)

    def start_gateway(self, workers: int) -> None:
        assert self.config_path is not None
        if self.gateway is not None:
            self.procs.stop(self.gateway)
        port = free_port()
        argv = [
            self.args.python,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(self.config_path),
            "--port",
            str(port),
        ]
        argv += ["--log-level", "warning", "--workers", str(workers)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cpus = GATEWAY_CPU if workers == 1 else BOTH_CPUS
        self.gateway = self.procs.start(f"gateway-w{workers}", argv, cpus, env)
        self.gateway_url = f"http://127.0.0.1:{port}"
        wait_http(self.gateway, self.gateway_url + "/healthz", 60)
        if workers > 1:
            time.sleep(1.5)  # let every worker finish starting, not just the first to answer
        self.gateway_pids = process_tree(self.gateway.pid)

    def start_litellm(self, workdir: Path) -> None:
        venv = Path(self.args.litellm_venv)
        venv = venv if venv.is_absolute() else ROOT / venv
        binary = venv / "bin" / "litellm"
        if not binary.exists():
            note = (
                f"LiteLLM skipped: no {binary}. To add it: python -m venv {self.args.litellm_venv} && "
                f"{self.args.litellm_venv}/bin/pip install 'litellm[proxy]'"
            )
            self.results.notes.append(note)
            log(note)
            return
        config = workdir / "litellm.yaml"
        # A local model costs nothing; saying so spares LiteLLM part of its per-request cost lookup.
        free = "{input_cost_per_token: 0, output_cost_per_token: 0, max_tokens: 4096}"
        config.write_text(f"""\
model_list:
  - model_name: bench
    litellm_params: {{model: "ollama_chat/{UPSTREAM_MODEL}", api_base: "{self.mock_url}"}}
    model_info: {free}
  - model_name: bench-paced
    litellm_params: {{model: "ollama_chat/{UPSTREAM_MODEL}", api_base: "{self.paced_url}"}}
    model_info: {free}
litellm_settings: {{telemetry: false, set_verbose: false}}
""")
        port = free_port()
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
        env["LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY"] = "true"  # no auth, like the gateway here
        env.pop("PYTHONPATH", None)
        argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--num_workers", "1"]
        log(f"starting LiteLLM proxy from {venv} (pinned to core {GATEWAY_CPU})")
        proc = self.procs.start("litellm", argv, GATEWAY_CPU, env)
        self.litellm_url = f"http://127.0.0.1:{port}"
        wait_http(proc, self.litellm_url + "/health/liveliness", 180)
        self.litellm = proc
        os.killpg(proc.pid, signal.SIGSTOP)

    @contextlib.contextmanager
    def active(self, endpoint: Endpoint) -> Iterator[None]:
        """Runs with LiteLLM resumed when `endpoint` is LiteLLM's."""
        if endpoint.via != "litellm" or self.litellm is None:
            yield
            return
        os.killpg(self.litellm.pid, signal.SIGCONT)
        try:
            yield
        finally:
            os.killpg(self.litellm.pid, signal.SIGSTOP)

    def define_endpoints(self) -> None:
        gw, mock, paced = self.gateway_url, self.mock_url, self.paced_url
        chat, native = "/v1/chat/completions", "/api/chat"
        self.endpoints = [
            Endpoint(
                "direct-ollama",
                "direct: mock Ollama /api/chat",
                "direct",
                mock,
                native,
                UPSTREAM_MODEL,
                "direct-ollama",
            ),
            Endpoint(
                "gateway-ollama",
                "gateway: OpenAI in, Ollama NDJSON -> SSE",
                "gateway",
                gw,
                chat,
                "bench",
                "direct-ollama",
            ),
            Endpoint(
                "direct-openai",
                "direct: mock OpenAI /v1",
                "direct",
                mock,
                chat,
                OPENAI_MODEL,
                "direct-openai",
            ),
            Endpoint(
                "gateway-openai",
                "gateway: OpenAI in, OpenAI out",
                "gateway",
                gw,
                chat,
                "bench-openai",
                "direct-openai",
            ),
        ]
        self.paced = [
            Endpoint(
                "direct-paced",
                "direct: paced mock /api/chat",
                "direct",
                paced,
                native,
                UPSTREAM_MODEL,
                "direct-paced",
            ),
            Endpoint(
                "gateway-paced", "gateway: NDJSON -> SSE", "gateway", gw, chat, "bench-paced", "direct-paced"
            ),
        ]
        if self.litellm_url:
            lite = self.litellm_url
            self.endpoints.append(
                Endpoint(
                    "litellm-ollama",
                    "LiteLLM: OpenAI in, Ollama out",
                    "litellm",
                    lite,
                    chat,
                    "bench",
                    "direct-ollama",
                )
            )
            self.paced.append(
                Endpoint(
                    "litellm-paced",
                    "LiteLLM: Ollama -> SSE",
                    "litellm",
                    lite,
                    chat,
                    "bench-paced",
                    "direct-paced",
                )
            )

    def check_answers(self) -> None:
        """One plain and one streamed answer on every path, checked, so that wrk measures real work."""
        expected = "".join(WORDS[i % len(WORDS)] for i in range(self.args.chunks))
        with httpx.Client(timeout=30) as client:
            for endpoint in self.endpoints + self.paced:
                with self.active(endpoint):
                    plain = client.post(endpoint.url, content=endpoint.body(False), headers=JSON)
                    streamed = client.post(endpoint.url, content=endpoint.body(True), headers=JSON)
                if plain.status_code != 200 or streamed.status_code != 200:
                    status = f"{plain.status_code}/{streamed.status_code}"
                    raise Failure(
                        f"{endpoint.label}: HTTP {status}: {plain.text[:300]} {streamed.text[:300]}"
                    )
                answer = plain.json()
                message = answer["message"] if endpoint.native else answer["choices"][0]["message"]
                pieces = stream_text(endpoint, streamed.text)
                if message["content"] != expected or pieces != expected:
                    raise Failure(f"{endpoint.label}: wrong answer: {message['content']!r} / {pieces!r}")

    # -- runs --

    def wrk_run(
        self,
        endpoint: Endpoint,
        *,
        stream: bool,
        connections: int,
        duration: float,
        stagger_ms: int = 0,
        rate: int = 0,
    ) -> WrkResult:
        pids = self.gateway_pids if endpoint.via == "gateway" else []
        with self.active(endpoint):
            before = self.cpu(pids)
            result = run_wrk(
                self.wrk,
                endpoint,
                stream=stream,
                connections=connections,
                duration=duration,
                stagger_ms=stagger_ms,
                rate=rate,
            )
            after = self.cpu(pids)
        if before is not None and after is not None and result.requests:
            result.cpu_us = (after - before) / result.requests * 1e6
        if result.error_count or not result.requests:
            what = (
                f"wrk errors {result.errors}"
                if result.error_count
                else f"nothing completed in {duration:g} s"
            )
            note = f"{endpoint.label}, {connections} connections, stream={stream}: {what}"
            if rate:
                note += f" (at {rate:,}/s offered)"
            if result.error_count:
                note += f" ({result.requests:,} answers in all)"
                self.results.error_runs.append(note)
            self.results.notes.append(note)
            log("  ! " + note)
        return result

    @staticmethod
    def cpu(pids: list[int]) -> float | None:
        """The CPU seconds these processes have used, or None when there are none or one has gone."""
        try:
            return sum(cpu_seconds(pid) for pid in pids) if pids else None
        except OSError:
            return None

    def warm_up(self) -> None:
        seconds = min(2.0, self.args.duration)
        log(f"warm-up: {seconds:g} s per path and mode")
        for endpoint in self.endpoints:
            for stream in (False, True):
                self.wrk_run(endpoint, stream=stream, connections=64, duration=seconds)

    def round(self, number: int) -> None:
        order = self.endpoints if number % 2 == 0 else list(reversed(self.endpoints))
        paced = self.paced if number % 2 == 0 else list(reversed(self.paced))
        duration, only = self.args.duration, self.args.only
        tag = f"[round {number + 1}/{self.args.rounds}]"
        runs = [("nonstream", False, 64, 0), ("stream", True, 64, 0), ("latency", False, 1, 0)]
        runs += [(rate_scenario(rate), False, 64, rate) for rate in self.args.rate]
        for scenario, stream, connections, rate in runs:
            if ("rate" if rate else scenario) not in only:
                continue
            for endpoint in order:
                result = self.wrk_run(
                    endpoint, stream=stream, connections=connections, duration=duration, rate=rate
                )
                self.results.add(scenario, endpoint.key, result)
                p50, p99 = result.p50_us / 1000, result.p99_us / 1000
                done = f"{result.rps:9,.0f}/s"
                late = f"  late {result.late:,}" if rate else ""
                times = f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms{late}"
                log(f"{tag} {scenario:9} {endpoint.key:15} {done}  {times}")
        if "ttft" in only:
            self.ttft_round(order, tag)
        if "paced" in only:
            for connections, staggered in PACED_RUNS:
                for endpoint in paced:
                    self.paced_run(endpoint, connections, staggered, tag)

    def paced_run(self, endpoint: Endpoint, connections: int, staggered: bool, tag: str) -> None:
        low, high = parse_delay(self.args.paced_delay)
        stream_ms = self.args.chunks * (low + high) / 2 * 1000  # a stream's expected length
        httpx.post(self.paced_url + "/_mock/reset", timeout=5)
        result = self.wrk_run(
            endpoint,
            stream=True,
            connections=connections,
            duration=self.args.duration,
            stagger_ms=round(stream_ms) if staggered else 0,
        )
        stats = httpx.get(self.paced_url + "/_mock/stats", timeout=5).json()
        result.paced_ms = float(stats["paced_ms_mean"]) if stats["streams"] else None
        self.results.add(paced_scenario(connections, staggered), endpoint.key, result)
        mean, pace = result.mean_us / 1000, result.paced_ms or 0.0
        rate = f"{result.rps:7,.1f}/s"
        line = f"{tag} paced c{connections:<4} {endpoint.key:15} {rate}  mean {mean:7.1f} ms, pace {pace:.1f}"
        log(line if staggered else line + " (all opened at once)")

    def ttft_round(self, order: list[Endpoint], tag: str) -> None:
        """Interleaves the streams of the direct and gateway paths; LiteLLM's go after, on their own."""
        times: dict[str, list[float]] = {}
        self.ttft_streams([e for e in order if e.via != "litellm"], times)
        for endpoint in order:
            if endpoint.via == "litellm":
                with self.active(endpoint):
                    self.ttft_streams([endpoint], times)
        for key, values in times.items():
            pair = (percentile(values, 50), percentile(values, 99))
            self.results.ttft.setdefault(key, []).append(pair)
            log(f"{tag} ttft      {key:15} p50 {pair[0] * 1000:6.3f} ms  p99 {pair[1] * 1000:6.3f} ms")

    def ttft_streams(self, endpoints: list[Endpoint], times: dict[str, list[float]]) -> None:
        clients = [StreamClient(endpoint) for endpoint in endpoints]
        deadline = time.monotonic() + 120
        try:
            for i in range(self.args.ttft_streams):
                if time.monotonic() > deadline:
                    self.results.notes.append(f"TTFT round stopped at {i} streams (time limit)")
                    break
                for client in clients if i % 2 == 0 else reversed(clients):
                    times.setdefault(client.endpoint.key, []).append(client.ttft())
        finally:
            for client in clients:
                client.close()

    def warm_up_gateway(self) -> None:
        gateway = next(e for e in self.endpoints if e.key == "gateway-ollama")
        for stream in (False, True):
            self.wrk_run(gateway, stream=stream, connections=64, duration=min(2.0, self.args.duration))

    def workers_run(self, workers: int) -> None:
        gateway = next(e for e in self.endpoints if e.key == "gateway-ollama")
        for number in range(self.args.rounds):
            for scenario, stream in (("nonstream", False), ("stream", True)):
                result = self.wrk_run(gateway, stream=stream, connections=64, duration=self.args.duration)
                self.results.workers.setdefault(workers, {}).setdefault(scenario, []).append(result)
                log(f"[workers {workers}, round {number + 1}] {scenario:9} {result.rps:9,.0f}/s")

    def memory_soak(self, total: int, limit: float) -> None:
        assert self.gateway is not None
        gateway = next(e for e in self.endpoints if e.key == "gateway-ollama")
        started = time.monotonic()
        sent, segment, stream = 0, 5.0, False
        self.results.memory.append((0, 0.0, rss_kb(self.gateway.pid)))
        while sent < total and time.monotonic() - started < limit:
            left = limit - (time.monotonic() - started)
            seconds = float(max(1, round(min(segment, left))))
            result = self.wrk_run(gateway, stream=stream, connections=64, duration=seconds)
            sent += result.requests
            self.results.memory_runs.append(result)
            elapsed = time.monotonic() - started
            kb = rss_kb(self.gateway.pid)
            self.results.memory.append((sent, elapsed, kb))
            log(f"[memory] {sent:>9,} requests  {elapsed:6.1f} s  RSS {kb / 1024:6.1f} MB")
            if result.rps > 0:  # aim for ~10 s segments, never past the total
                segment = max(1.0, min(10.0, (total - sent) / result.rps))
            stream = not stream
        if sent < total:
            self.results.notes.append(
                f"memory soak stopped at {sent:,} of {total:,} requests (time limit {limit:g} s)"
            )


JSON = {"content-type": "application/json"}


def stream_text(endpoint: Endpoint, body: str) -> str:
    pieces: list[str] = []
    lines = body.splitlines()
    if endpoint.native:
        objects = [json.loads(line) for line in lines if line.strip()]
        if not objects or not objects[-1].get("done"):
            raise Failure(f"{endpoint.label}: the NDJSON stream has no final done line")
        pieces = [str(obj["message"]["content"]) for obj in objects]
    else:
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if not data or data[-1] != "[DONE]":
            raise Failure(f"{endpoint.label}: the SSE stream does not end with [DONE]")
        for payload in data[:-1]:
            for choice in json.loads(payload).get("choices") or []:
                pieces.append(str((choice.get("delta") or {}).get("content") or ""))
    return "".join(pieces)


# ---- report ----


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


# Run by the gateway's interpreter, which `--python` may make another than this driver's.
PYTHON_PROBE = """
import importlib.util, os, platform, sys
found = [name for name in ("uvloop", "httptools") if importlib.util.find_spec(name)]
print(f"Python {platform.python_version()} at {os.path.realpath(sys.executable)}", end="; ")
print("speedups installed:", ", ".join(found) or "none")
"""


def machine(python: str) -> str:
    command = [python, "-c", PYTHON_PROBE]
    probe = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    gateway = probe.stdout.strip() or f"{python} did not answer ({probe.stderr.strip()[-200:]})"
    return f"{describe_machine()}; the gateway: {gateway}"


def added(results: Results, scenario: str, endpoint: Endpoint, attr: str) -> float:
    """Median over rounds of (this path - its direct path) for one wrk statistic, in µs."""
    mine, theirs = results.runs(scenario, endpoint.key), results.runs(scenario, endpoint.direct)
    return median([getattr(a, attr) - getattr(b, attr) for a, b in zip(mine, theirs, strict=False)])


def report(bench: Bench, out: IO[str]) -> None:  # noqa: PLR0915
    args, results = bench.args, bench.results
    w = out.write
    w(f"\n## Gateway overhead against a zero-latency mock\n\n{bench.machine}; ")
    w(f"1-minute load average before the run: {results.load_before:.2f}.")
    if results.steadiness:
        shares = "; ".join(
            f"{when} the run, min {min(v):.2f} and median {median(v):.2f} over {len(v)} s"
            for when, v in results.steadiness.items()
            if v
        )
        w(f" How steady the host kept the gateway's core (fixed work per second on core {GATEWAY_CPU}, ")
        w(f"as a share of the best second): {shares}.")
    w("\n\n")
    if results.error_runs:
        w(
            f"**{len(results.error_runs)} wrk run(s) had errors** (answers that were not 2xx/3xx, socket "
            f"errors or timeouts; listed in the notes). Their rows are marked{ERROR_MARK}: wrk counts an "
            "error answer as a request done, so those figures do not measure the path, and the targets "
            "they feed count as not met.\n\n"
        )
    if args.only:
        w(
            f"{args.rounds} round(s) of {args.duration:g} s per run, medians over rounds; wrk -t1 and the "
            f"mocks on core {LOAD_CPU}, the gateway on core {GATEWAY_CPU} ({args.workers[0]} worker(s)); "
            f"{args.chunks} content chunks per stream.\n\n"
        )

    def cell(scenario: str, endpoint: Endpoint, attr: str) -> float:
        return median([getattr(r, attr) for r in results.runs(scenario, endpoint.key)])

    if any(s in args.only for s in ("nonstream", "stream", "latency")):
        w(
            f"| through | non-streaming req/s | p50 ms | p99 ms | vs direct | {args.chunks}-chunk streams/s "
            "| p99 ms | vs direct | c=1 p50 ms | c=1 p99 ms | added p50 ms | added p99 ms |\n"
        )
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for e in bench.endpoints:
            direct = next(x for x in bench.endpoints if x.key == e.direct)
            by_scenario = [results.runs(s, e.key) for s in ("nonstream", "stream", "latency")]
            row = [e.label + (ERROR_MARK if erred(*by_scenario) else "")]
            rps, srps = cell("nonstream", e, "rps"), cell("stream", e, "rps")
            row += [f"{rps:,.0f}", ms(cell("nonstream", e, "p50_us")), ms(cell("nonstream", e, "p99_us"))]
            row.append("" if e is direct else f"{rps / cell('nonstream', direct, 'rps'):.2f}")
            row += [f"{srps:,.0f}", ms(cell("stream", e, "p99_us"))]
            row.append("" if e is direct else f"{srps / cell('stream', direct, 'rps'):.2f}")
            row += [ms(cell("latency", e, "p50_us")), ms(cell("latency", e, "p99_us"))]
            if e is direct:
                row += ["", ""]
            else:
                row += [
                    f"{added(results, 'latency', e, 'p50_us') / 1000:.3f}",
                    f"{added(results, 'latency', e, 'p99_us') / 1000:.3f}",
                ]
            w("| " + " | ".join(row).replace("nan", "-") + " |\n")
        w("\n")

    if any(results.wrk.get(rate_scenario(rate)) for rate in args.rate):
        rate_table(bench, out)
    cpu_table(bench, out)

    if results.ttft:
        w(
            f"Time to first content, {args.ttft_streams} sequential streams per path and round "
            f"(raw-socket client on core {LOAD_CPU}), paired in each round:\n\n"
        )
        w("| through | TTFT p50 ms | TTFT p99 ms | added p50 ms | added p99 ms |\n")
        w("|---|---:|---:|---:|---:|\n")
        for e in bench.endpoints:
            mine = results.ttft.get(e.key, [])
            if not mine:
                continue
            theirs = results.ttft.get(e.direct, [])
            p50, p99 = median([p[0] for p in mine]) * 1000, median([p[1] for p in mine]) * 1000
            row = [e.label, f"{p50:.3f}", f"{p99:.3f}"]
            if e.key == e.direct:
                row += ["", ""]
            else:
                row += [
                    f"{median([a[0] - b[0] for a, b in zip(mine, theirs, strict=False)]) * 1000:.3f}",
                    f"{median([a[1] - b[1] for a, b in zip(mine, theirs, strict=False)]) * 1000:.3f}",
                ]
            w("| " + " | ".join(row) + " |\n")
        w("\n")

    if "paced" in args.only and results.wrk.get(paced_scenario(*PACED_RUNS[0])):
        w(
            f"Paced upstream: {args.chunks} tokens, each after {args.paced_delay} ms (uniform, seeded). "
            "'Excess' is the mean total time minus the mean pacing of the streams the mock completed in "
            "that run, which takes the draw's noise out; 'added' is excess minus the direct path's. "
            "The streams start spread over one stream's expected length, except in the 'at once' rows, "
            "where every connection opens its first stream in the same millisecond.\n\n"
        )
        w("| streams | through | streams/s | mean ms | p50 ms | p99 ms | excess ms | added ms |\n")
        w("|---|---|---:|---:|---:|---:|---:|---:|\n")
        for connections, staggered in PACED_RUNS:
            scenario = paced_scenario(connections, staggered)
            for e in bench.paced:
                runs = results.runs(scenario, e.key)
                if not runs:
                    continue
                excess = median([r.mean_us / 1000 - r.paced_ms for r in runs if r.paced_ms is not None])
                base_runs = results.runs(scenario, e.direct)
                more = [
                    (a.mean_us / 1000 - a.paced_ms) - (b.mean_us / 1000 - b.paced_ms)
                    for a, b in zip(runs, base_runs, strict=False)
                    if a.paced_ms is not None and b.paced_ms is not None
                ]
                row = [
                    str(connections) if staggered else f"{connections} at once",
                    e.label + (ERROR_MARK if erred(runs) else ""),
                    f"{cell(scenario, e, 'rps'):,.1f}",
                    ms(cell(scenario, e, "mean_us")),
                    ms(cell(scenario, e, "p50_us")),
                    ms(cell(scenario, e, "p99_us")),
                    f"{excess:.2f}",
                    "" if e.key == e.direct else f"{median(more):.2f}",
                ]
                w("| " + " | ".join(row).replace("nan", "-") + " |\n")
        w("\n")

    rss = results.rss_kb
    if rss:
        w("Gateway memory (VmRSS, the process and its workers):\n\n| moment | RSS MB |\n|---|---:|\n")
        for moment, kb in rss.items():
            w(f"| {moment} | {kb / 1024:.1f} |\n")
        w("\n")

    if results.workers:
        w(
            "`serve --workers N` on the Ollama path (64 connections). One worker is pinned to "
            f"core {GATEWAY_CPU}; more run on cores {BOTH_CPUS}, sharing core {LOAD_CPU} with wrk and "
            "the mock:\n\n"
        )
        w(f"| workers | non-streaming req/s | vs 1 | CPU µs/request | {args.chunks}-chunk streams/s | vs 1 ")
        w("| CPU µs/stream |\n|---:|---:|---:|---:|---:|---:|---:|\n")
        base = results.workers.get(1, {})
        for count, scenarios in sorted(results.workers.items()):
            row = [str(count) + (ERROR_MARK if erred(*scenarios.values()) else "")]
            for scenario in ("nonstream", "stream"):
                runs, first = scenarios.get(scenario, []), base.get(scenario, [])
                rps = median([r.rps for r in runs])
                row += [f"{rps:,.0f}", f"{rps / median([r.rps for r in first]):.2f}", f"{cpu_us(runs):.0f}"]
            w(("| " + " | ".join(row) + " |\n").replace("nan", "-"))
        w(
            "\nA worker's CPU per request grows as its own load falls (the same instructions run slower "
            'on a core that waits between requests; see "What a p99 under 10 ms at 64 connections asks '
            'for" in bench/README.md, and compare c=1 and the fixed rates with c=64 above), and 64 '
            f"connections over more workers load each less. The second also shares core {LOAD_CPU} with "
            "wrk and the mock.\n\n"
        )

    if results.memory:
        start, warm, last = soak_points(results.memory)
        peak = max(kb for _, _, kb in results.memory)
        w(
            f"Memory soak: {last[0]:,} requests in {last[1]:.0f} s (non-streaming and streaming segments "
            f"alternating, 64 connections); 'warm' is the first sample after a tenth of the requests:\n\n"
        )
        w("| RSS at start MB | warm MB | peak MB | at end MB | growth since start | growth since warm |\n")
        w("|---:|---:|---:|---:|---:|---:|\n")
        since_start, since_warm = (last[2] / start[2] - 1) * 100, (last[2] / warm[2] - 1) * 100
        errors = sum(r.error_count for r in results.memory_runs)
        mark = f"{ERROR_MARK} ({errors:,} errors)" if errors else ""
        w(
            f"| {start[2] / 1024:.1f} | {warm[2] / 1024:.1f} ({warm[0]:,} requests) | {peak / 1024:.1f} "
            f"| {last[2] / 1024:.1f}{mark} | {since_start:+.1f}% | {since_warm:+.1f}% |\n\n"
        )

    targets(bench, out)
    if results.notes:
        w("Notes:\n\n" + "".join(f"- {note}\n" for note in results.notes) + "\n")


Sample = tuple[int, float, int]  # requests so far, seconds, RSS kB


def rate_scenario(rate: int) -> str:
    return f"rate{rate}"


def late_pct(runs: list[WrkResult]) -> float:
    """Median over rounds of the share of requests that left behind their schedule, in %."""
    return median([r.late / max(1, r.requests) for r in runs]) * 100


def holds(runs: list[WrkResult]) -> bool:
    """Whether a path kept the p99 target at an offered rate: median p99 under 10 ms, and the
    schedule kept (under 1% of the requests late), and no error answers."""
    kept = median([r.p99_us for r in runs]) / 1000 < TARGETS["p99_ms"] and late_pct(runs) < 1
    return kept and not erred(runs)


def rate_table(bench: Bench, out: IO[str]) -> None:
    results, rates = bench.results, bench.args.rate
    offered = ", ".join(f"{rate:,}" for rate in rates)
    out.write(
        f"Non-streaming at fixed rates: {offered} requests/s offered over 64 connections, each "
        "request due at its own moment of one schedule (`pace` in bench/wrk/report.lua). 'Late' counts "
        "the requests that left more than 1 ms behind it because every connection was still waiting "
        "for an answer; wrk times those from when they left, so many late requests mean the path "
        "could not keep up and the latencies understate a client's wait.\n\n"
    )
    out.write(
        "| offered | through | req/s done | p50 ms | p90 ms | p99 ms | late | added p50 ms | added p99 ms |\n"
    )
    out.write("|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for rate in rates:
        scenario = rate_scenario(rate)
        for e in bench.endpoints:
            runs = results.runs(scenario, e.key)
            if not runs:
                continue
            label = e.label + (ERROR_MARK if erred(runs) else "")
            row = [f"{rate:,}/s", label, f"{median([r.rps for r in runs]):,.0f}"]
            row += [ms(median([getattr(r, attr) for r in runs])) for attr in ("p50_us", "p90_us", "p99_us")]
            row.append(f"{late_pct(runs):.1f}%")
            if e.key == e.direct:
                row += ["", ""]
            else:
                row += [f"{added(results, scenario, e, attr) / 1000:.3f}" for attr in ("p50_us", "p99_us")]
            out.write("| " + " | ".join(row).replace("nan", "-") + " |\n")
    out.write("\nThe highest of the loads offered at which the p99 stayed under 10 ms, under 1% late:\n\n")
    for e in bench.endpoints:
        by_rate = {rate: results.runs(rate_scenario(rate), e.key) for rate in rates}
        if any(by_rate.values()):
            best = max((rate for rate, done in by_rate.items() if done and holds(done)), default=0)
            out.write(f"- {e.label}: {f'{best:,} req/s' if best else f'none of {offered}'}\n")
    out.write("\n")


def cpu_us(runs: list[WrkResult]) -> float:
    """Median over rounds of the gateway's CPU per request, in µs (NaN when not measured)."""
    return median([r.cpu_us for r in runs if r.cpu_us is not None])


def cpu_table(bench: Bench, out: IO[str]) -> None:
    """The gateway's CPU per request in each scenario: what it costs as the load changes."""
    results = bench.results
    columns = [("nonstream", "non-streaming, c=64"), ("stream", f"{bench.args.chunks}-chunk stream, c=64")]
    columns += [("latency", "non-streaming, c=1")]
    columns += [(rate_scenario(rate), f"non-streaming at {rate:,}/s") for rate in bench.args.rate]
    columns = [(scenario, title) for scenario, title in columns if results.wrk.get(scenario)]
    gateways = [e for e in bench.endpoints if e.via == "gateway"]
    if not columns or not gateways:
        return
    out.write(
        "The gateway's CPU per request, µs (user and kernel time of its processes over each wrk run, "
        "medians over rounds):\n\n"
    )
    out.write("| through | " + " | ".join(title for _, title in columns) + " |\n")
    out.write("|---|" + "---:|" * len(columns) + "\n")
    for e in gateways:
        cells = [cpu_us(results.runs(scenario, e.key)) for scenario, _ in columns]
        label = e.label + (ERROR_MARK if erred(*(results.runs(s, e.key) for s, _ in columns)) else "")
        out.write(f"| {label} | " + " | ".join(f"{c:.0f}" for c in cells).replace("nan", "-") + " |\n")
    out.write("\n")


def soak_points(samples: list[Sample]) -> tuple[Sample, Sample, Sample]:
    """The first sample, the first after a tenth of the requests (warm), and the last."""
    first, last = samples[0], samples[-1]
    warm = next((s for s in samples[1:] if s[0] >= last[0] / 10), last)
    return first, warm, last


def targets(bench: Bench, out: IO[str]) -> None:
    results, rows = bench.results, []
    gateway = next((e for e in bench.endpoints if e.key == "gateway-ollama"), None)
    if gateway is None:
        return

    def check(name: str, value: float, ok: bool, text: str, *runs: list[WrkResult]) -> None:
        """A target's row; not met, whatever the value, when the runs it is read from had errors."""
        if math.isnan(value):
            return
        if erred(*runs):
            rows.append((name, text + ERROR_MARK, "**no** (error answers)"))
        else:
            rows.append((name, text, "yes" if ok else "**no**"))

    plain, streams = results.runs("nonstream", gateway.key), results.runs("stream", gateway.key)
    latency = results.runs("latency", gateway.key) + results.runs("latency", gateway.direct)
    rps, srps = median([r.rps for r in plain]), median([r.rps for r in streams])
    p99 = median([r.p99_us for r in plain]) / 1000
    add50, add99 = (added(results, "latency", gateway, a) / 1000 for a in ("p50_us", "p99_us"))
    check("non-streaming >= 5,000 req/s at c=64", rps, rps >= TARGETS["rps"], f"{rps:,.0f}", plain)
    check(
        "non-streaming p99 < 10 ms at c=64, saturated", p99, p99 < TARGETS["p99_ms"], f"{p99:.2f} ms", plain
    )
    # the same target read as a load, not a limit: at the lowest rate offered that meets its 5,000
    at = min((rate for rate in bench.args.rate if rate >= TARGETS["rps"]), default=None)
    offered = results.runs(rate_scenario(at), gateway.key) if at else []
    if at and offered:
        p99 = median([r.p99_us for r in offered]) / 1000
        name = f"non-streaming p99 < 10 ms at {at:,} req/s offered (c=64)"
        check(name, p99, holds(offered), f"{p99:.2f} ms, {late_pct(offered):.1f}% late", offered)
    check("NDJSON -> SSE >= 1,500 streams/s", srps, srps >= TARGETS["streams"], f"{srps:,.0f}", streams)
    check("added p50 <= 0.3 ms at c=1", add50, add50 <= TARGETS["added_p50_ms"], f"{add50:.3f} ms", latency)
    check("added p99 <= 1 ms at c=1", add99, add99 <= TARGETS["added_p99_ms"], f"{add99:.3f} ms", latency)
    mine, theirs = results.ttft.get(gateway.key, []), results.ttft.get(gateway.direct, [])
    if mine and theirs:
        ttft = median([a[0] - b[0] for a, b in zip(mine, theirs, strict=False)]) * 1000
        check("added TTFT <= 0.5 ms (p50)", ttft, ttft <= 0.5, f"{ttft:.3f} ms")
    for connections, staggered in PACED_RUNS:
        if not staggered:  # the burst is reported above; the target is about streams in flight
            continue
        runs = results.runs(paced_scenario(connections, staggered), "gateway-paced")
        direct = results.runs(paced_scenario(connections, staggered), "direct-paced")
        more = [
            (a.mean_us - b.mean_us) / 1000 - ((a.paced_ms or 0) - (b.paced_ms or 0))
            for a, b in zip(runs, direct, strict=False)
        ]
        if more:
            value, total = median(more), median([b.mean_us / 1000 for b in direct])
            name = f"paced, {connections} streams: adds < 1% of total time"
            check(name, value, value < total / 100, f"{value:+.2f} ms of {total:.0f} ms", runs, direct)
    start = results.rss_kb.get("after start")
    if start:
        check("RSS < 80 MB after start", start, start / 1024 < 80, f"{start / 1024:.1f} MB")
    if len(results.memory) > 2:
        _, warm, last = soak_points(results.memory)
        growth = (last[2] / warm[2] - 1) * 100
        name = f"RSS growth <= 10% over {last[0]:,} requests (since warm)"
        check(name, growth, growth <= 10, f"{growth:+.1f}%", results.memory_runs)
    if rows:
        out.write(
            "Targets (gateway, Ollama path, one worker unless stated):\n\n| target | measured | met |\n"
        )
        out.write("|---|---:|:---:|\n" + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows) + "\n")


# ---- main ----


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="whole seconds per wrk run (default 5)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 round of 2 s runs, 100 TTFT streams"
    )
    parser.add_argument(
        "--only", default=None, help=f"comma-separated scenarios (default all): {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--workers", default="1", help="gateway worker counts, e.g. 1,2; the first runs every scenario"
    )
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream (default 20)")
    parser.add_argument(
        "--rate",
        default="3000,4000,5000",
        help="requests/s offered in the 'rate' scenario, comma-separated (default 3000,4000,5000)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter that runs the gateway, with the project installed (default: this one)",
    )
    parser.add_argument("--paced-delay", default="10-50", help="ms before each token of the paced mock")
    parser.add_argument("--ttft-streams", type=int, default=500, help="sequential streams per path and round")
    parser.add_argument("--memory", type=int, default=0, metavar="N", help="send N requests and sample RSS")
    parser.add_argument(
        "--memory-time-limit", type=float, default=420, help="seconds at most for --memory (420)"
    )
    parser.add_argument("--peers", action="store_true", help="add LiteLLM's proxy when it is installed")
    parser.add_argument(
        "--litellm-venv", default=".venv-litellm", help="venv with litellm[proxy] (default .venv-litellm)"
    )
    parser.add_argument(
        "--steadiness",
        type=int,
        default=10,
        help="seconds of fixed work on the gateway's core before and after the run, to show how "
        "steady the host keeps it (default 10, 3 with --quick, 0 to skip)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 2
        args.ttft_streams = min(args.ttft_streams, 100)
        args.steadiness = min(args.steadiness, 3)
    if args.only is None:
        args.only = set() if args.memory else set(SCENARIOS)
    else:
        args.only = {s.strip() for s in args.only.split(",") if s.strip()}
        if unknown := args.only - set(SCENARIOS):
            parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    try:
        args.workers = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error("--workers takes counts such as 1,2")
    try:
        args.rate = sorted({int(n) for n in args.rate.split(",")})
    except ValueError:
        parser.error("--rate takes requests/s such as 3000,4000,5000")
    if not 1 <= args.rounds <= MAX_ROUNDS or not 1 <= args.duration <= MAX_DURATION:
        parser.error(f"--rounds must be 1..{MAX_ROUNDS} and --duration 1..{MAX_DURATION}")
    if not 1 <= args.ttft_streams <= MAX_TTFT_STREAMS or not 0 <= args.memory <= MAX_MEMORY_REQUESTS:
        parser.error(f"--ttft-streams must be 1..{MAX_TTFT_STREAMS} and --memory 0..{MAX_MEMORY_REQUESTS}")
    if not all(1 <= n <= 8 for n in args.workers) or not 1 <= args.chunks <= 1000:
        parser.error("--workers counts must be 1..8 and --chunks 1..1000")
    if not 0 <= args.steadiness <= MAX_DURATION:
        parser.error(f"--steadiness must be 0..{MAX_DURATION} seconds")
    if not all(1 <= rate <= 100_000 for rate in args.rate):
        parser.error("--rate values must be 1..100000 requests/s")
    args.memory_time_limit = min(args.memory_time_limit, 1800)
    return args


def estimate(args: argparse.Namespace) -> float:
    """Roughly how long a run takes, in seconds (the TTFT streams counted at ~3 ms each)."""
    paths = 5 if args.peers else 4
    wrk_runs = paths * len(args.only & {"nonstream", "stream", "latency"})
    wrk_runs += paths * len(args.rate) if "rate" in args.only else 0
    wrk_runs += len(PACED_RUNS) * (paths // 2) if "paced" in args.only else 0
    seconds: float = 10 + (30 if args.peers else 0) + 2 * args.steadiness
    if args.only:
        seconds += paths * 2 * min(2.0, args.duration) + args.rounds * wrk_runs * (args.duration + 0.3)
        seconds += args.rounds * args.ttft_streams * paths * 0.003 if "ttft" in args.only else 0
    seconds += (len(args.workers) - 1) * (8 + 2 * min(2.0, args.duration) + args.rounds * 2 * args.duration)
    soak: float = min(args.memory_time_limit, args.memory / 500) if args.memory else 0.0
    return seconds + soak


def run(args: argparse.Namespace, workdir: Path) -> Bench:
    if (os.cpu_count() or 1) < 2:
        raise Failure("this benchmark pins the gateway and the load on separate cores: it needs 2 CPUs")
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # this driver (and its TTFT client) lives with the load
    procs = Processes(workdir, pin=True)
    bench = Bench(args, procs, ensure_wrk(), machine=machine(args.python))
    started = time.monotonic()
    log(f"this run takes about {estimate(args) / 60:.1f} minutes")
    bench.results.load_before = os.getloadavg()[0]
    if bench.results.load_before > 0.5:
        load = bench.results.load_before
        log(f"warning: the machine is busy (load {load:.2f}); the numbers will be low and noisy")
    if args.steadiness:
        bench.results.steadiness["before"] = steadiness(GATEWAY_CPU, args.steadiness)
    try:
        bench.start_mocks()
        bench.write_config(workdir)
        if args.peers:
            bench.start_litellm(workdir)
        for index, workers in enumerate(args.workers):
            bench.start_gateway(workers)
            assert bench.gateway is not None
            bench.define_endpoints()
            if index == 0:
                bench.results.rss_kb["after start"] = rss_kb(bench.gateway.pid)
                bench.check_answers()
                if args.only:
                    bench.warm_up()
                    bench.results.rss_kb["after warm-up"] = rss_kb(bench.gateway.pid)
                    for number in range(args.rounds):
                        bench.round(number)
                    bench.results.rss_kb["after the rounds"] = rss_kb(bench.gateway.pid)
                if args.memory:
                    bench.memory_soak(args.memory, args.memory_time_limit)
                    bench.results.rss_kb["after the memory soak"] = rss_kb(bench.gateway.pid)
                if len(args.workers) > 1 and args.only & {"nonstream", "stream"}:
                    scenarios = bench.results.wrk
                    bench.results.workers[workers] = {
                        s: scenarios[s]["gateway-ollama"] for s in ("nonstream", "stream") if s in scenarios
                    }
            else:
                bench.warm_up_gateway()
                bench.workers_run(workers)
    finally:
        procs.stop_all()
    if args.steadiness:
        bench.results.steadiness["after"] = steadiness(GATEWAY_CPU, args.steadiness)
    log(f"done in {time.monotonic() - started:.0f} s")
    return bench


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    with tempfile.TemporaryDirectory(prefix="phoenix-bench-") as tmp, exit_on_failure():
        bench = run(args, Path(tmp))
    report(bench, sys.stdout)
    if args.json:
        raw = {
            "args": {
                k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
            },
            "machine": bench.machine,
            "wrk": {
                s: {k: [asdict(r) for r in rs] for k, rs in e.items()} for s, e in bench.results.wrk.items()
            },
            "ttft_s": bench.results.ttft,
            "rss_kb": bench.results.rss_kb,
            "workers": {
                n: {s: [asdict(r) for r in rs] for s, rs in e.items()}
                for n, e in bench.results.workers.items()
            },
            "memory": bench.results.memory,
            "steadiness": bench.results.steadiness,
            "notes": bench.results.notes,
            "error_runs": bench.results.error_runs,
        }
        args.json.write_text(json.dumps(raw, indent=1))
    if bench.results.error_runs:
        count = len(bench.results.error_runs)
        log(f"error: {count} wrk run(s) had error answers (marked{ERROR_MARK} in the report):")
        for note in bench.results.error_runs:
            log(f"  {note}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
