"""Run an ASGI app under a real uvicorn server on a free loopback port, in a thread.

Used for fake backends and for the gateway itself in end-to-end tests: what the
client sees is real HTTP over a real socket, with incremental delivery and real
disconnects, which `TestClient` and `ASGITransport` cannot show. `gateway_process`
runs the gateway as users do, as its own `serve` process.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trustme
import uvicorn


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerThread:
    """One uvicorn server in a daemon thread; `url` is its base URL."""

    def __init__(
        self, app: Any, port: int | None = None, http: Any = "auto", tls: TlsFiles | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            http=http,
            log_level="warning",
            lifespan="auto",
            loop="asyncio",
            timeout_graceful_shutdown=2,
            ssl_certfile=tls.certificate if tls else None,
            ssl_keyfile=tls.key if tls else None,
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())
        self.loop.close()

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on port {self.port} did not start in 10 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            raise RuntimeError(f"server on port {self.port} did not stop in 10 s")


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate for 127.0.0.1, its key, and the bundle of the CA that signed it."""

    certificate: str
    key: str
    ca_bundle: str

    @classmethod
    def issue(cls, directory: Path) -> TlsFiles:
        """A new CA of the test's own, and a certificate from it (trustme: no network, no openssl)."""
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        files = cls(*(str(directory / name) for name in ("server.pem", "server.key", "ca.pem")))
        server.cert_chain_pems[0].write_to_path(files.certificate)
        server.private_key_pem.write_to_path(files.key)
        ca.cert_pem.write_to_path(files.ca_bundle)
        return files


@contextmanager
def serve(app: Any, port: int | None = None, tls: TlsFiles | None = None) -> Iterator[ServerThread]:
    server = ServerThread(app, port, tls=tls).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class GatewayProcess:
    """A `phoenix-gateway serve` process; its stderr (the log) goes to `log`."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def wait_for_workers(metrics_directory: Path, count: int, limit: float = 30) -> None:
    """Until `count` worker processes have built their app, which is when each has read the config
    file (each then has metric files named by its pid in PROMETHEUS_MULTIPROC_DIR). `/healthz`
    answering says only that one has."""
    deadline = time.monotonic() + limit
    while len({path.stem.rpartition("_")[2] for path in metrics_directory.glob("*.db")}) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} workers started within {limit:g} s")
        time.sleep(0.05)


@contextmanager
def gateway_process(
    args: Sequence[str], log: Path, env: Mapping[str, str] | None = None, limit: float = 30
) -> Iterator[GatewayProcess]:
    """`python -m gateway serve ARGS` on a free loopback port, yielded once `/healthz` answers and
    terminated at the end; a traceback anywhere in its log fails the test."""
    port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", *args, "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    gateway = GatewayProcess(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + limit
        while True:
            try:
                httpx.get(gateway.url + "/healthz", timeout=0.5)
                break
            except httpx.TransportError:
                assert process.poll() is None, f"the gateway exited: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "the gateway did not start in time"
                time.sleep(0.1)
        yield gateway
    finally:
        process.terminate()
        process.wait(timeout=limit)
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


@contextmanager
def redis_server(directory: Path, limit: float = 10) -> Iterator[str]:
    """A real `redis-server` (Debian's package, from scripts/install-services.sh) on a free loopback
    port, without persistence; yields its URL and stops it at the end."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed: run scripts/install-services.sh"
    port = free_port()
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        [*command, "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + limit
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert process.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not start in time"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=limit)


@contextmanager
def no_free_descriptors() -> Iterator[None]:
    """Until the block ends, this process can open no file descriptor (EMFILE), as a gateway that
    has run out of them: the soft RLIMIT_NOFILE is lowered to the lowest one free."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.dup(0)
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def unaccepting_address() -> Iterator[str]:
    """The URL of a listener whose accept queue is full, so a connection attempt gets no answer
    (its SYN is dropped), as from a firewalled or frozen host."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(4)]
    try:
        for filler in fillers:  # never accepted
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
