"""Instructions per request: the gateway's own work, counted rather than timed.

On a shared machine the time a request takes moves by a quarter between runs, which hides the
changes of a few percent that tuning is made of. This counts instructions instead. The app
(`create_app`, everything below uvicorn) runs in one process under valgrind's cachegrind, with
instruction counting only, and is called directly through ASGI in batches of `--concurrency`
requests, against `bench/mock_upstream.py` in its own process. Each measurement is two runs, one
with only the warm-up and one with `--requests` more; the difference divided by that number is
one request's count, start-up and warm-up excluded. Repeated runs agree within about 1%; paced
streams within about 5%, since how many tokens one read carries depends on timing.

Left out: uvicorn's HTTP parsing and writing (about a quarter of a request's CPU under wrk) and
the kernel's work. Under valgrind the app runs about 50 times slower; a run takes a minute.

`--served` counts the whole server instead: `gateway serve` (uvicorn, its HTTP protocol and the
app) runs under valgrind, and a client in this process sends the requests over loopback, each of
`--concurrency` keep-alive connections sending its next request when the previous answer has
arrived, as wrk does. Only the kernel's work is left out.

    .venv/bin/python bench/instructions.py                       # chat, stream, paced
    .venv/bin/python bench/instructions.py --tree ../other-checkout --only chat   # A/B
    .venv/bin/python bench/instructions.py --served --only chat,stream

valgrind comes from apt when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import ROOT, Failure, Processes, exit_on_failure, free_port, log, one_mock_config, wait_http

MODES = {  # mode: (streamed, the mock's arguments)
    "chat": (False, []),
    "stream": (True, []),
    "paced": (True, ["--delay-ms", "50"]),  # one token per read, even at valgrind's pace
}
WARM_UP = 200


def ensure_valgrind() -> str:
    found = shutil.which("valgrind")
    if found:
        return found
    command = ["apt-get", "install", "-y", "-q", "valgrind"]
    if os.geteuid() != 0:
        command = ["sudo", "-n", *command]
    log(f"valgrind not found; installing it: {' '.join(command)}")
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    found = shutil.which("valgrind")
    if not found:
        raise Failure("valgrind is still not on PATH after installing it")
    return found


def chat_body(streamed: bool) -> bytes:
    flag = b"true" if streamed else b"false"
    return (
        b'{"model":"bench","stream":%s,"messages":[{"role":"user","content":"Why is the sky blue?"}]}' % flag
    )


# ---- the measured process: the app in-process, driven through ASGI ----


async def drive(tree: str, port: int, streamed: bool, requests: int, concurrency: int) -> None:
    sys.path.insert(0, tree)  # the measured checkout's package, whatever is installed
    create_app = importlib.import_module("gateway.app").create_app
    parse_config = importlib.import_module("gateway.config").parse_config
    configure = importlib.import_module("gateway.logs").configure

    backend = {"name": "mock-ollama", "type": "ollama", "base_url": f"http://127.0.0.1:{port}"}
    route = {"name": "bench", "deployments": [{"backend": "mock-ollama", "model": "llama3.2:latest"}]}
    config = parse_config({"backends": [backend], "models": [route]}, "bench")
    configure("warning")  # as bench/gateway.py serves it
    app = create_app(config)
    body = chat_body(streamed)
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
    ]

    async def one() -> None:
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "headers": list(headers),
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080),
        }  # fmt: skip
        sent: list[dict[str, Any]] = []
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never leaves
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        if sent[0].get("status") != 200:
            raise SystemExit(f"the gateway answered {sent[0].get('status')}")

    gc.collect()
    gc.freeze()  # as `serve` does
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    for count in (WARM_UP, requests):
        for start in range(0, count, concurrency):
            await asyncio.gather(*(one() for _ in range(min(concurrency, count - start))))


def under_cachegrind(valgrind: str) -> list[str]:
    """valgrind counting instructions only: no cache simulation, no output file."""
    return [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]


def instructions_in(report: str) -> int | None:
    """The total valgrind prints when the measured process exits ("I refs: 1,234,567")."""
    found = re.search(r"I\s+refs:\s+([\d,]+)", report)
    return int(found.group(1).replace(",", "")) if found else None


# ---- the served measurement: `gateway serve` under valgrind, a client here ----


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    """One request on a kept-alive connection, its answer read whole (content-length or chunked)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        raise Failure(f"the gateway answered {status}")
    found = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    if found:
        await reader.readexactly(int(found.group(1)))
        return
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def send_requests(port: int, streamed: bool, batches: Sequence[int], concurrency: int) -> None:
    """Each batch of requests over the same connections, one batch after the other."""
    body = chat_body(streamed)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    left = 0

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await exchange(reader, writer, request)

    try:
        for batch in batches:
            left = batch
            await asyncio.gather(*(one(reader, writer) for reader, writer in connections))
    finally:
        for _, writer in connections:
            writer.close()


def count_served(
    valgrind: str, tree: str, mock_port: int, workdir: Path, *, streamed: bool, requests: int,
    concurrency: int,
) -> int:  # fmt: skip
    config = workdir / "served.yaml"
    config.write_text(one_mock_config(mock_port))
    port = free_port()
    argv = under_cachegrind(valgrind)
    argv += [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
    argv += ["--log-level", "warning"]
    processes = Processes(workdir)
    server = processes.start("served", argv, "1", cwd=tree)  # `-m` imports the package from there
    try:
        wait_http(server, f"http://127.0.0.1:{port}/healthz", 300)
        asyncio.run(send_requests(port, streamed, (WARM_UP, requests), concurrency))
    finally:
        processes.stop_all()
    counted = instructions_in(server.log_path.read_text(errors="replace"))
    if counted is None:
        raise Failure(f"the served run left no count ({server.popen.returncode}):\n{server.tail()}")
    return counted


# ---- the driver ----


def count(valgrind: str, tree: str, port: int, *, streamed: bool, requests: int, concurrency: int) -> int:
    argv = under_cachegrind(valgrind)
    argv += [sys.executable, __file__, "--drive", "--tree", tree, "--port", str(port)]
    argv += ["--requests", str(requests), "--concurrency", str(concurrency)]
    argv += ["--streamed"] if streamed else []
    done = subprocess.run(["taskset", "-c", "1", *argv], capture_output=True, text=True, check=False)
    counted = instructions_in(done.stderr)
    if done.returncode != 0 or counted is None:
        raise Failure(f"the measured run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return counted


def measure(valgrind: str, mode: str, args: argparse.Namespace, workdir: Path) -> int:
    streamed, mock_args = MODES[mode]
    processes = Processes(workdir)
    try:
        port = free_port()
        mock = processes.start(
            "mock", [sys.executable, "bench/mock_upstream.py", "--port", str(port), *mock_args], "0"
        )
        wait_http(mock, f"http://127.0.0.1:{port}/_mock/stats", 10)

        def run(requests: int) -> int:
            if args.served:
                return count_served(
                    valgrind, args.tree, port, workdir, streamed=streamed, requests=requests,
                    concurrency=args.concurrency,
                )  # fmt: skip
            return count(
                valgrind, args.tree, port, streamed=streamed, requests=requests, concurrency=args.concurrency
            )

        base, more = run(0), run(args.requests)
    finally:
        processes.stop_all()
    return (more - base) // int(args.requests)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", default=str(ROOT), help="checkout whose gateway package is measured")
    parser.add_argument("--only", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--requests", type=int, default=1280, help="requests per measurement (default 1280)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at once (default 64)")
    parser.add_argument("--served", action="store_true", help="count `gateway serve` whole, uvicorn included")
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--streamed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    if (args.requests < 1 and not args.drive) or args.concurrency < 1:
        parser.error("--requests and --concurrency must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.drive:
        uvloop.run(drive(args.tree, args.port, args.streamed, args.requests, args.concurrency))
        return 0
    with exit_on_failure():
        valgrind = ensure_valgrind()
        git = ["git", "-C", args.tree, "rev-parse", "--short", "HEAD"]
        revision = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip() or "?"
        how = "served by uvicorn" if args.served else "the app through ASGI"
        print(f"gateway at {revision} ({args.tree}), {how}; ", end="")
        print(f"{args.requests} requests, {args.concurrency} at once")
        print("\n| request | instructions per request |\n|---|---:|")
        with tempfile.TemporaryDirectory(prefix="phoenix-instructions-") as workdir:
            for mode in args.only.split(","):
                per_request = measure(valgrind, mode, args, Path(workdir))
                print(f"| {mode} | {per_request:,} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
