"""What the gateway adds in front of a real Ollama: time to first token and tokens/s, against direct.

Starts a real Ollama (from scripts/test-engines.sh) with the tiny random-weight model, and the
gateway as its own process (`phoenix-gateway serve`). Then, alternating within each round so that
both see the same machine state, streams the same request (same seed, so the same tokens) directly
to Ollama's `/api/chat` and through the gateway's `/v1/chat/completions`, and prints the medians.

    .venv/bin/python bench/real_ollama.py [--rounds 30] [--tokens 256] [--json out.json]

Loopback only; the number of requests is bounded by --rounds (at most 500).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.engines import MODELS, TINY, RealOllama, wait_for_http  # noqa: E402
from tests.servers import free_port  # noqa: E402

PROMPT = [{"role": "user", "content": "Tell me a long story about a river."}]


@dataclass
class Run:
    ttft: float  # seconds from sending the request to the first content
    tokens: int
    decode: float  # seconds from the first content to the last

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens - 1) / self.decode if self.decode > 0 else 0.0


def timed(lines: Iterator[str], content_of: Callable[[str], str | None], started: float) -> Run:
    first = last = 0.0
    tokens = 0
    for line in lines:
        if content_of(line):
            last = time.perf_counter()
            first = first or last
            tokens += 1
    if not tokens:
        raise RuntimeError("no content arrived")
    return Run(first - started, tokens, last - first)


def native_content(line: str) -> str | None:
    if not line:
        return None
    content: str | None = json.loads(line).get("message", {}).get("content")
    return content


def sse_content(line: str) -> str | None:
    if not line.startswith("data: {"):
        return None
    choices = json.loads(line[6:]).get("choices") or [{}]
    content: str | None = choices[0].get("delta", {}).get("content")
    return content


def direct(client: httpx.Client, url: str, seed: int, tokens: int) -> Run:
    body = {
        "model": TINY,
        "messages": PROMPT,
        "options": {"temperature": 0.8, "seed": seed, "num_predict": tokens},
    }
    started = time.perf_counter()
    with client.stream("POST", url + "/api/chat", json=body) as response:
        response.raise_for_status()
        return timed(response.iter_lines(), native_content, started)


def through(client: httpx.Client, url: str, seed: int, tokens: int) -> Run:
    body = {
        "model": "tiny",
        "messages": PROMPT,
        "temperature": 0.8,
        "seed": seed,
        "max_tokens": tokens,
        "stream": True,
    }
    started = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        return timed(response.iter_lines(), sse_content, started)


def start_gateway(ollama_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = workdir / "gateway.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "backends": [{"name": "real", "type": "ollama", "base_url": ollama_url}],
                "models": [{"name": "tiny", "deployments": [{"backend": "real", "model": TINY}]}],
                "server": {"log_level": "warning"},
            }
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "gateway.log").open("wb"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/healthz", process, str(workdir / "gateway.log"))
    return process, url


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def report(runs: dict[str, list[Run]], tokens: int) -> dict[str, object]:
    summary: dict[str, object] = {"tokens": tokens, "rounds": len(runs["direct"])}
    for name, results in runs.items():
        summary[name] = {
            "ttft_ms_p50": round(median_ms([r.ttft for r in results]), 3),
            "ttft_ms_max": round(max(r.ttft for r in results) * 1000, 3),
            "tokens_per_s_p50": round(statistics.median(r.tokens_per_second for r in results), 1),
        }
    added = [g.ttft - d.ttft for d, g in zip(runs["direct"], runs["gateway"], strict=True)]
    summary["added_ttft_ms_p50"] = round(median_ms(added), 3)
    direct_tps = statistics.median(r.tokens_per_second for r in runs["direct"])
    gateway_tps = statistics.median(r.tokens_per_second for r in runs["gateway"])
    summary["tokens_per_s_ratio"] = round(gateway_tps / direct_tps, 3)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args()
    rounds = max(1, min(args.rounds, 500))

    ollama = RealOllama()
    gateway: subprocess.Popen[bytes] | None = None
    try:
        for name in MODELS:
            ollama.ensure_model(name)
        with tempfile.TemporaryDirectory() as workdir:
            gateway, gateway_url = start_gateway(ollama.url, Path(workdir))
            runs: dict[str, list[Run]] = {"direct": [], "gateway": []}
            with httpx.Client(timeout=60) as client:
                direct(client, ollama.url, 0, 8)  # load the model into a runner
                through(client, gateway_url, 0, 8)
                for round_ in range(rounds):
                    order = [("direct", direct, ollama.url), ("gateway", through, gateway_url)]
                    for name, run, url in order if round_ % 2 else order[::-1]:
                        runs[name].append(run(client, url, 1000 + round_, args.tokens))
    finally:
        if gateway is not None:
            os.killpg(gateway.pid, 15)
            gateway.wait(timeout=10)
        ollama.stop()

    summary = report(runs, args.tokens)
    print(f"real Ollama, tiny random model, {args.tokens} tokens per stream, {rounds} rounds, median")
    print(f"{'path':<10} {'TTFT ms':>9} {'TTFT max':>9} {'tokens/s':>9}")
    for name in ("direct", "gateway"):
        row = summary[name]
        assert isinstance(row, dict)
        print(f"{name:<10} {row['ttft_ms_p50']:>9} {row['ttft_ms_max']:>9} {row['tokens_per_s_p50']:>9}")
    added, ratio = summary["added_ttft_ms_p50"], summary["tokens_per_s_ratio"]
    print(f"added TTFT p50: {added} ms; tokens/s through/direct: {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
