"""Two checkouts' gateways on one core at the same time: which spends less CPU per request.

On a shared virtual machine the same tree's CPU per request moves by a quarter from one run to
the next, and by more when the host is busy, so runs one after the other cannot show a change of
a few percent. Here both gateways run at once, pinned to the same core (1), each loaded by its
own wrk at `--connections` (both wrk and the mock upstream on core 0). The core is shared between
them, so whatever slows it slows both alike, and each one's CPU time (utime + stime from
/proc, the kernel's work for its sockets included) over the requests it completed is comparable
within a round. A round's result is B's CPU per request over A's; the first round warms both up
and is not counted. The same checkout against itself gives 0.99-1.00 (a bias of about 0.5%).

    .venv/bin/python bench/side_by_side.py ../before .          # B/A below 1: B is cheaper
    .venv/bin/python bench/side_by_side.py ../before . --stream --rounds 8
    .venv/bin/python bench/side_by_side.py ../before . --stream --openai   # the OpenAI-compatible path
    .venv/bin/python bench/side_by_side.py . . --python-b /path/to/other-venv/bin/python

The last compares interpreters rather than code: `--python-a` and `--python-b` run a gateway with
another Python, which must have the project's dependencies installed (a venv of its own).

Loopback only; each round is bounded by --duration.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from procs import (  # noqa: E402
    Failure,
    Processes,
    cpu_seconds,
    exit_on_failure,
    free_port,
    log,
    one_mock_config,
    wait_http,
    wrk_report,
)

LOAD_CPU, GATEWAY_CPU = "0", "1"


def wrk(url: str, stream: bool, connections: int, duration: int) -> int:
    """Requests wrk completed against `url`; any error fails the run."""
    command = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s"]
    command += [
        "-s",
        str(BENCH / "wrk" / "openai_chat.lua"),
        url,
        "--",
        "true" if stream else "false",
        "bench",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 30, check=False)
    data, errors = wrk_report(done.stdout + done.stderr, done.returncode, url)
    if errors:
        raise Failure(f"wrk saw errors on {url}: {errors}")
    return int(data["requests"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", help="checkout A (the reference)")
    parser.add_argument("b", help="checkout B (the change)")
    parser.add_argument("--rounds", type=int, default=6, help="counted rounds (default 6)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per round (default 5)")
    parser.add_argument("--connections", type=int, default=64, help="per gateway (default 64)")
    parser.add_argument("--stream", action="store_true", help="20-chunk streams instead of JSON answers")
    parser.add_argument(
        "--openai", action="store_true", help="an OpenAI-compatible backend, not Ollama's API"
    )
    for side in ("a", "b"):
        what = f"the interpreter of {side.upper()} (default: this one)"
        parser.add_argument(f"--python-{side}", default=sys.executable, help=what)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.connections < 1:
        parser.error("--rounds, --duration and --connections must be positive")
    return args


def start_gateway(procs: Processes, name: str, tree: str, python: str, config: Path) -> tuple[str, int]:
    """`gateway serve` from checkout `tree`, run by `python`, on the gateway core: its chat URL and
    its pid."""
    port = free_port()
    command = [python, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
    command += ["--log-level", "warning"]
    proc = procs.start(name, command, GATEWAY_CPU, cwd=Path(tree).resolve())  # `-m` imports from there
    wait_http(proc, f"http://127.0.0.1:{port}/healthz", 60)
    return f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid


def one_round(
    pool: ThreadPoolExecutor, gateways: list[tuple[str, int]], args: argparse.Namespace
) -> list[tuple[int, float]]:
    """Both wrk at once: for each gateway, the requests it answered and its CPU µs per request."""
    before = [cpu_seconds(pid) for _, pid in gateways]
    runs = [pool.submit(wrk, url, args.stream, args.connections, args.duration) for url, _ in gateways]
    done = [run.result() for run in runs]
    spent = [cpu_seconds(pid) - start for (_, pid), start in zip(gateways, before, strict=True)]
    return [(count, seconds / count * 1e6) for count, seconds in zip(done, spent, strict=True)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: `apt-get install wrk` (bench/gateway.py installs it)", file=sys.stderr)
        return 1
    with exit_on_failure(), tempfile.TemporaryDirectory(prefix="phoenix-side-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            mock_port = free_port()
            mock_command = [sys.executable, "bench/mock_upstream.py", "--port", str(mock_port)]
            mock = procs.start("mock", mock_command, LOAD_CPU)
            wait_http(mock, f"http://127.0.0.1:{mock_port}/api/version", 20)
            config = workdir / "gateway.yaml"
            config.write_text(one_mock_config(mock_port, openai=args.openai))
            gateways = [
                start_gateway(procs, "a", args.a, args.python_a, config),
                start_gateway(procs, "b", args.b, args.python_b, config),
            ]
            what = ("20-chunk streams" if args.stream else "JSON answers") + (
                " from an OpenAI-compatible backend" if args.openai else " from Ollama"
            )
            print(f"A: {args.a} ({args.python_a})\nB: {args.b} ({args.python_b})")
            print(f"{what}, {args.connections} connections each, both gateways on core {GATEWAY_CPU}")
            print("\n| round | A requests | A µs CPU/request | B requests | B µs CPU/request | B/A |")
            print("|---:|---:|---:|---:|---:|---:|")
            ratios = []
            with ThreadPoolExecutor(2) as pool:
                one_round(pool, gateways, args)
                log("warm-up round done")
                for number in range(1, args.rounds + 1):
                    (a_count, a_cpu), (b_count, b_cpu) = one_round(pool, gateways, args)
                    ratios.append(b_cpu / a_cpu)
                    cells = f"{a_count:,} | {a_cpu:.0f} | {b_count:,} | {b_cpu:.0f} | {ratios[-1]:.3f}"
                    print(f"| {number} | {cells} |", flush=True)
            print(f"\nmedian B/A: {statistics.median(ratios):.3f} over {len(ratios)} rounds")
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
