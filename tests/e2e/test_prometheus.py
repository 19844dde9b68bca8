"""Observability proven with a real Prometheus: it scrapes a real gateway (in front of a fake Ollama)
every second, loads deploy/prometheus/alerts.yml, and answers the queries the dashboard and the
alerts rely on with the traffic this test sent. promtool also checks the live /metrics text.

Prometheus and promtool come from scripts/install-services.sh; without them this fails, never skips.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Config
from tests.deploy.test_monitoring import ALERTS, alert_rules, dashboard, dashboard_queries, to_promql
from tests.e2e.conftest import ollama_config
from tests.fakes.ollama_server import FakeOllama
from tests.servers import ServerThread, free_port

pytestmark = pytest.mark.e2e

FakeServer = tuple[FakeOllama, ServerThread]
TTFT_P50 = (
    "histogram_quantile(0.5, sum by (le)"
    ' (rate(gateway_time_to_first_token_seconds_bucket{job="phoenix-gateway"}[1m])))'
)
CHAT_200 = 'sum(gateway_requests_total{job="phoenix-gateway",endpoint="chat",status="200"})'


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/install-services.sh")
    return path


@contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    """A real Prometheus on a free loopback port, scraping `target` every second; yields its URL."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{ALERTS}']\n"
        "scrape_configs:\n"
        f"  - {{job_name: phoenix-gateway, static_configs: [{{targets: ['{target}']}}]}}\n"
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def query(url: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=5)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (promql, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def scalar(url: str, promql: str) -> float | None:
    """The value of a query that returns one sample, else None."""
    result = query(url, promql)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def poll(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def chat(gateway: ServerThread, *, stream: bool) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200, response.text
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]")


def test_prometheus_scrapes_the_gateway_and_answers_dashboard_and_alert_queries(
    tmp_path: Path, fake_ollama: FakeServer, start_gateway: Callable[[Config], ServerThread]
) -> None:
    gateway = start_gateway(ollama_config(fake_ollama[1].url))
    with prometheus(tmp_path, f"127.0.0.1:{gateway.port}") as url:
        # First traffic, and wait until Prometheus has seen it: a rate needs a sample before
        # the rest of the traffic, since the labelled series only exist from their first request.
        chat(gateway, stream=False)
        chat(gateway, stream=True)
        assert poll(lambda: scalar(url, CHAT_200) == 2), query(url, CHAT_200)
        for _ in range(4):
            chat(gateway, stream=False)
        for _ in range(2):
            chat(gateway, stream=True)

        assert poll(lambda: scalar(url, CHAT_200) == 8), query(url, CHAT_200)
        assert poll(lambda: (value := scalar(url, TTFT_P50)) is not None and math.isfinite(value)), query(
            url, TTFT_P50
        )
        streamed = 'sum(gateway_request_duration_seconds_count{endpoint="chat",stream="true"})'
        assert scalar(url, streamed) == 3
        assert scalar(url, 'sum(gateway_time_to_first_token_seconds_count{backend="ollama-1"})') == 3
        backend_up = 'gateway_backend_up{job="phoenix-gateway",backend="ollama-1"}'
        assert poll(lambda: scalar(url, backend_up) == 1), query(url, backend_up)
        assert scalar(url, 'up{job="phoenix-gateway"}') == 1
        assert (scalar(url, 'sum(gateway_tokens_total{type="completion"})') or 0) > 0

        # Every dashboard query runs, as Grafana would send it with "All" selected.
        for promql in dashboard_queries(dashboard()):
            query(url, to_promql(promql))

        # The alert rules are loaded, evaluate without error, and none fires on healthy traffic.
        def evaluated() -> list[dict[str, Any]]:
            response = httpx.get(url + "/api/v1/rules", params={"type": "alert"}, timeout=5).json()
            return [rule for group in response["data"]["groups"] for rule in group["rules"]]

        never = "0001-01-01T00:00:00Z"  # Prometheus's zero time: not evaluated yet
        assert poll(lambda: all(rule.get("lastEvaluation", never) != never for rule in evaluated()))
        rules = evaluated()
        assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
        broken = [
            (rule["name"], rule["health"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"
        ]
        assert broken == []
        assert [rule["name"] for rule in rules if rule["state"] != "inactive"] == []

    # promtool's linter on the live exposition text.
    metrics = httpx.get(gateway.url + "/metrics", timeout=5).text
    lint = [tool("promtool"), "check", "metrics"]
    result = subprocess.run(lint, input=metrics, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n--- /metrics ---\n{metrics}"
