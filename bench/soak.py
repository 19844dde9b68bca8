"""A soak: 100k mixed requests through the gateway, faults sprinkled in, memory and descriptors watched.

Starts, each as its own process on a free loopback port: the fast mock (`bench/mock_upstream.py`), a
paced one (tokens every 1-4 ms, so that clients can leave in the middle of a stream), two instances
of a misbehaving Ollama (`bench/faulty_upstream.py`) and the gateway (`python -m gateway serve`)
with a config written to a temporary directory. A raw-asyncio HTTP/1.1 client (httpx drove only
~150 requests/s here, at 90% of a core) sends `--requests` requests, `--concurrency` at a time on
keep-alive connections, drawn from a seeded mix; every answer is checked against what that request
must get:

    chat                non-streaming chat on the fast mock       200 and the whole answer
    stream              streaming chat (a third with usage)        200, every chunk, then [DONE]
    stream-slow         streaming chat on the paced mock           200, every chunk, then [DONE]
    disconnect          paced stream; the client leaves after 1-5 events (FIN or RST)
    models              GET /v1/models                             200 and the configured names
    bad-json, bad-content-type, bad-field, n2                      400 in OpenAI's error shape
    unknown-model       a new unknown name each time               404 model_not_found
    oversized           a body past server.max_body_bytes          413
    fault-* (`--fault-ratio`, 5% by default, half streamed; the model name picks the fault; one
    instance each, `routing.retries: 0`; stall and hang on a backend with timeouts of 1 s for the
    first token and 0.5 s between chunks, the others with 10 s):
      fault-500         the upstream answers 500                   502
      fault-429         429 with Retry-After: 7                    429 and Retry-After: 7
      fault-reset       TCP reset right after 3 NDJSON lines       stream: SSE error event; else 502
      fault-truncated   the stream ends without `done: true`       stream: SSE error event; else 502
                                                                   (both with code upstream_incomplete)
      fault-malformed   3 lines and one that is not JSON, in one   stream: SSE error event; else 502
                        read (or a body that is not JSON)
      fault-stall       1.5 s of silence after 3 lines             stream: SSE error event; else 504
      fault-hang        no answer at all                           504 after the first-token timeout
      fault-refused     a port where nothing listens               503

A stream's error event must be the last event, with no [DONE], and the response must end (a stall
stream on a gateway starved of CPU may also give 504: see FAULTS in `bench/soak_client.py`).

The gateway's processes are sampled every 0.5 s (VmRSS, open descriptors); at the start (after
`--warmup` requests), at the end and after `--idle` seconds of quiet, the script also counts the
gateway's TCP connections per upstream. The gateway's HTTP/1.1 pool does not reuse a connection idle
for 4 s and closes it when it next touches the pool of that upstream (there is no timer), which the
health and inventory loop does every 10 s: after 20 s of quiet, what is left to each upstream is the
connection that loop used last. The exit status is 1 on any unexpected answer, a Traceback or an
error-level line in the gateway's log, an in-flight gauge not back at 0, a chat request the gateway
did not count, descriptors growing, more than two connections per worker to an upstream (or one not
ESTABLISHED) after the quiet, a client connection left open, or requests left unsent at
`--max-seconds`.

    .venv/bin/python bench/soak.py --quick                  # 5,000 requests, about half a minute
    .venv/bin/python bench/soak.py [--requests 100000] [--concurrency 32] [--fault-ratio 0.05]
        [--seed 1] [--workers 1] [--max-seconds 1200] [--idle 20] [--json FILE]

Pinned with taskset when there are two cores (`--no-pin` to leave it): the gateway on core 1, the
client, the upstreams and this driver on core 0. Loopback only; every wait is bounded.

The plan, the client and the checks are in `bench/soak_client.py`; starting the processes and
reading /proc, /metrics and the log in `bench/soak_rig.py`; this file runs the soak and reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from procs import Processes, describe_machine, exit_on_failure, log, on_sigterm  # noqa: E402
from soak_client import DESCRIBED, FAULTS, MIX, Client, Tally, plan  # noqa: E402
from soak_rig import (  # noqa: E402
    BOTH_CPUS,
    GATEWAY_CPU,
    LOAD_CPU,
    GatewayView,
    LogScan,
    Reading,
    Rig,
    Sample,
    read_gateway,
    sample_forever,
    scan_log,
    settle,
    start_rig,
)

FD_SLACK = 16  # descriptors after the idle wait may exceed those at the start by this many
# connections per gateway worker to one upstream after the idle wait: the one the probe loop keeps,
# and for an instant the one that replaces it
IDLE_UPSTREAM_CONNECTIONS = 2


# ---- the run ----


@dataclass
class Results:
    args: dict[str, Any]
    machine: str
    requests: int = 0
    warmup: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    start: Reading | None = None
    end: Reading | None = None
    idle: Reading | None = None
    peak_rss_kb: int = 0
    peak_fds: int = 0
    settle_seconds: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    view: GatewayView | None = None
    log: LogScan = field(default_factory=LogScan)
    cut_short: bool = False
    problems: list[str] = field(default_factory=list)


async def soak(args: argparse.Namespace, rig: Rig, results: Results) -> None:
    tally = results.tally
    specs = plan(args.seed, args.fault_ratio)
    began = time.monotonic()
    client = Client(rig.gateway_port, tally, began + args.max_seconds)
    sampler = asyncio.create_task(sample_forever(rig, tally, results.samples, began))
    try:
        log(f"warm-up: {args.warmup:,} requests")
        await client.run(specs, args.warmup, args.concurrency)
        results.warmup = tally.done
        await settle(rig, tally)
        results.start = read_gateway(rig)
        log(
            f"soak: {args.requests:,} requests, {args.concurrency} at a time (at most {args.max_seconds:g} s)"
        )
        started = time.monotonic()
        await client.run(specs, args.requests, args.concurrency)
        results.seconds = time.monotonic() - started
        results.requests = tally.done - results.warmup
        results.rate = results.requests / results.seconds if results.seconds else 0.0
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    results.cut_short = client.cut_short
    results.view, results.settle_seconds = await settle(rig, tally)
    results.end = read_gateway(rig)
    if args.idle:
        log(f"idle for {args.idle:g} s (the probe loop closes upstream connections idle for 4 s within 14 s)")
        await asyncio.sleep(args.idle)
        results.idle = read_gateway(rig)
    results.peak_rss_kb = max([s.rss_kb for s in results.samples] + [results.end.rss_kb])
    results.peak_fds = max([s.fds for s in results.samples] + [results.end.fds])


def verdict(args: argparse.Namespace, results: Results) -> None:
    problems, tally, view = results.problems, results.tally, results.view
    if bad := sum(tally.unexpected.values()):
        problems.append(f"{bad} unexpected answer(s)")
    if results.cut_short:
        problems.append(f"the time limit ({args.max_seconds:g} s) stopped the run at {tally.done:,} requests")
    if view is not None:
        if stuck := {name: value for name, value in view.inflight.items() if value}:
            problems.append(f"gateway_inflight_requests not back at 0: {stuck}")
        if view.chat_total != tally.chat_posts:
            problems.append(
                f"the gateway counted {view.chat_total:,} chat requests; {tally.chat_posts:,} were sent"
            )
    if results.log.tracebacks or results.log.errors:
        problems.append(
            f"gateway log: {results.log.tracebacks} Traceback(s), {results.log.errors} error line(s)"
        )
    last = results.idle or results.end
    if results.start and last and last.fds > results.start.fds + FD_SLACK:
        problems.append(f"open fds grew from {results.start.fds} to {last.fds}")
    if last and last.connections["clients"]:
        problems.append(f"client connections still open at the gateway: {last.connections['clients']}")
    if results.idle:
        limit = IDLE_UPSTREAM_CONNECTIONS * args.workers
        for name, states in results.idle.connections.items():
            if name != "clients" and (sum(states.values()) > limit or set(states) - {"ESTABLISHED"}):
                problems.append(f"connections to {name} after {args.idle:g} s of quiet: {states}")


def run(args: argparse.Namespace, workdir: Path) -> Results:
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {int(LOAD_CPU)})  # the client lives with the upstreams
    results = Results(
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        machine=machine(args, pin),
    )
    procs = Processes(workdir, pin=pin)
    try:
        rig = start_rig(args, workdir, procs)
        try:
            asyncio_run(soak(args, rig, results))
        finally:
            gateway_alive = rig.gateway.popen.poll() is None
            procs.stop_all()
            rig.refused.close()
        results.log = scan_log(rig.gateway.log_path)
        verdict(args, results)
        if not gateway_alive:
            results.problems.append("the gateway exited during the run:\n" + rig.gateway.tail())
    finally:
        procs.stop_all()
    return results


def asyncio_run(coro: Awaitable[None]) -> None:
    try:
        import uvloop  # noqa: PLC0415

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(coro)  # type: ignore[arg-type]


# ---- the report ----


def machine(args: argparse.Namespace, pin: bool) -> str:
    where = (
        (
            f"gateway on core {GATEWAY_CPU if args.workers == 1 else BOTH_CPUS}, client and upstreams on "
            f"core {LOAD_CPU}"
        )
        if pin
        else "not pinned"
    )
    return (
        f"{describe_machine()}; {args.workers} worker(s), {where}; log level {args.log_level}; "
        f"load average before the run {os.getloadavg()[0]:.2f}"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def connections_text(name: str, reading: Reading | None) -> str:
    if reading is None:
        return ""
    states = reading.connections.get(name, {})
    if not states:
        return "0"
    return ", ".join(f"{count} {state}" for state, count in sorted(states.items()))


def memory_table(results: Results, start: Reading, end: Reading) -> str:
    """Start, peak, end (and after the idle wait): memory, descriptors, connections."""
    idle = results.idle
    columns: list[tuple[str, Reading | None]] = [
        ("start (after warm-up)", start),
        ("peak", None),
        ("end", end),
    ]
    if idle is not None:
        columns.append((f"after {results.args['idle']:g} s idle", idle))

    def row(label: str, cell: Callable[[Reading | None], object]) -> str:
        return f"| {label} | " + " | ".join(str(cell(reading)) for _, reading in columns) + " |"

    lines = [
        "| gateway | " + " | ".join(name for name, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
        row("VmRSS MB", lambda r: f"{(r.rss_kb if r else results.peak_rss_kb) / 1024:.1f}"),
        row("VmHWM MB", lambda r: f"{r.hwm_kb / 1024:.1f}" if r else ""),
        row("open fds", lambda r: r.fds if r else results.peak_fds),
    ]
    for name in end.connections:
        label = "client connections" if name == "clients" else f"TCP to {name}"
        lines.append(row(label, functools.partial(connections_text, name)))
    growth = (end.rss_kb / start.rss_kb - 1) * 100
    return "\n".join(lines) + f"\n\nRSS growth from start to end: {growth:+.1f}%.\n"


def report(results: Results) -> str:
    out: list[str] = []
    w = out.append
    start, end = results.start, results.end
    w(f"\n## Soak\n\n{results.machine}.\n")
    args = results.args
    w(
        f"{results.requests:,} requests after {results.warmup:,} warm-up ones in {results.seconds:.1f} s: "
        f"{results.rate:,.0f} requests/s; concurrency {args['concurrency']}, seed {args['seed']}, "
        f"fault ratio {args['fault_ratio']:g}. In-flight back to 0 {results.settle_seconds:.1f} s after the "
        "last answer.\n"
    )
    if start and end:
        w(memory_table(results, start, end))
    w(outcome_table(results.tally))
    if results.view is not None:
        view = results.view
        statuses = ", ".join(f"{s}: {n:,}" for s, n in sorted(view.chat_statuses.items()))
        w(
            f"The gateway's count (gateway_requests_total, chat): {view.chat_total:,} for "
            f"{results.tally.chat_posts:,} sent; by status {statuses}."
        )
        errors = ", ".join(f"{k}: {v:,}" for k, v in sorted(view.upstream_errors.items()))
        w(f"gateway_upstream_errors_total: {errors or 'none'}.")
        w(f"gateway_inflight_requests at the end: {view.inflight}.")
    scan = results.log
    w(
        f"Gateway log: {scan.lines:,} lines, {scan.warnings:,} warnings, {scan.errors} errors, "
        f"{scan.tracebacks} Tracebacks.\n"
    )
    if results.tally.examples or scan.examples:
        w("First unexpected answers and log errors:\n")
        out.extend(f"- {example}" for example in results.tally.examples + scan.examples)
        w("")
    w("Verdict: " + ("PASS" if not results.problems else "FAIL\n- " + "\n- ".join(results.problems)))
    return "\n".join(out) + "\n"


def outcome_table(tally: Tally) -> str:
    lines = [
        "| requests | count | expected | seen | unexpected | p50 ms | p99 ms |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    order = [kind for kind, _ in MIX] + [f"{f} {m}" for f in FAULTS for m in ("plain", "stream")]
    for row in sorted(tally.outcomes, key=lambda r: order.index(r) if r in order else len(order)):
        seen = tally.outcomes[row]
        if row in DESCRIBED:
            expected = DESCRIBED[row]
        else:
            fault, mode = row.split()
            expected = " or ".join(e.describe() for e in FAULTS[fault][mode == "stream"])
        seconds = tally.seconds[row]
        outcomes = ", ".join(f"{name} x{count:,}" for name, count in seen.most_common())
        lines.append(
            f"| {row} | {sum(seen.values()):,} | {expected} | {outcomes} | {tally.unexpected[row]} | "
            f"{percentile(seconds, 50) * 1000:.1f} | {percentile(seconds, 99) * 1000:.1f} |"
        )
    total = sum(sum(seen.values()) for seen in tally.outcomes.values())
    lines.append(f"| all | {total:,} | | | {sum(tally.unexpected.values())} | | |")
    return "\n".join(lines) + "\n"


def as_json(results: Results) -> dict[str, Any]:
    tally = results.tally
    return {
        "args": results.args,
        "machine": results.machine,
        "requests": results.requests,
        "warmup": results.warmup,
        "seconds": results.seconds,
        "requests_per_second": results.rate,
        "rss_kb": {
            "start": results.start and results.start.rss_kb,
            "peak": results.peak_rss_kb,
            "end": results.end and results.end.rss_kb,
            "after_idle": results.idle and results.idle.rss_kb,
            "hwm_end": results.end and results.end.hwm_kb,
        },
        "fds": {
            "start": results.start and results.start.fds,
            "peak": results.peak_fds,
            "end": results.end and results.end.fds,
            "after_idle": results.idle and results.idle.fds,
        },
        "connections": {
            moment: reading and reading.connections
            for moment, reading in (
                ("start", results.start),
                ("end", results.end),
                ("after_idle", results.idle),
            )
        },
        "outcomes": {row: dict(seen) for row, seen in tally.outcomes.items()},
        "unexpected": dict(tally.unexpected),
        "unexpected_examples": tally.examples,
        "latency_ms": {
            row: {
                "p50": percentile(s, 50) * 1000,
                "p99": percentile(s, 99) * 1000,
                "mean": statistics.fmean(s) * 1000,
            }
            for row, s in tally.seconds.items()
        },
        "gateway": results.view and asdict(results.view),
        "log": asdict(results.log),
        "settle_seconds": results.settle_seconds,
        "samples": [asdict(s) for s in results.samples],
        "problems": results.problems,
        "passed": not results.problems,
    }


# ---- main ----


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--requests", type=int, default=100_000, help="requests after the warm-up (default 100000)")
    add("--warmup", type=int, default=1000, help="requests before the start measurement (default 1000)")
    add("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    add("--fault-ratio", type=float, default=0.05, help="share of fault-* requests (default 0.05)")
    add("--seed", type=int, default=1, help="seed of the request mix (default 1)")
    add("--max-seconds", type=float, default=1200, help="stop sending after this long (default 1200)")
    add(
        "--idle",
        type=float,
        default=20,
        help="seconds of quiet before the last reading (default 20; 0: none)",
    )
    add("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    add("--log-level", default="info", choices=["info", "warning"], help="the gateway's (default info)")
    add("--quick", action="store_true", help="5,000 requests after 500 warm-up: checks the script itself")
    add("--no-pin", action="store_true", help="do not pin processes to cores with taskset")
    add("--workdir", type=Path, help="keep the config and logs here (default: a temporary directory)")
    add("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.warmup = min(args.requests, 5000), min(args.warmup, 500)
    if not 1 <= args.requests <= 10_000_000 or not 0 <= args.warmup <= 100_000:
        parser.error("--requests must be 1..10000000 and --warmup 0..100000")
    if not 1 <= args.concurrency <= 1024 or not 0 <= args.fault_ratio <= 1:
        parser.error("--concurrency must be 1..1024 and --fault-ratio 0..1")
    if not 1 <= args.workers <= 8 or not 0 < args.max_seconds <= 24 * 3600 or not 0 <= args.idle <= 600:
        parser.error("--workers must be 1..8, --max-seconds up to a day and --idle 0..600")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="phoenix-soak-")))
        else:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        with exit_on_failure():
            results = run(args, workdir)
    print(report(results), flush=True)
    if args.json:
        args.json.write_text(json.dumps(as_json(results), indent=1))
    return 1 if results.problems else 0


if __name__ == "__main__":
    sys.exit(main())
