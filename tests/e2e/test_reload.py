"""A config reload on SIGHUP, in a real `phoenix-gateway serve` process: instances added and removed
while a stream is in flight, nothing dropped, metrics and the audit chain carried on; a broken
config changes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway import http1
from gateway.audit import verify
from tests.e2e.conftest import StreamInBackground, sample, scrape, wait_for
from tests.fakes.faulty_server import FaultyOllama, ok, sleep
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.servers import GatewayProcess, ServerThread, free_port, gateway_process, serve, wait_for_workers

pytestmark = pytest.mark.e2e
SLOW = Reply(content=" ".join(f"w{i}" for i in range(40)), delay_between=0.05)  # about 2 s
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


class Served:
    def __init__(self, fakes: dict[str, FakeOllama], servers: dict[str, ServerThread], tmp: Path) -> None:
        self.fakes = fakes
        self.servers = servers
        self.config_path = tmp / "gateway.yaml"
        self.audit_path = tmp / "audit.jsonl"
        self.log_path = tmp / "stderr.log"
        self.gateway: GatewayProcess | None = None

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    def write_config(self, names: list[str]) -> None:
        config = {
            "backends": [{"name": n, "type": "ollama", "base_url": self.servers[n].url} for n in names],
            "models": [{"name": "llama3.2", "deployments": [{"backend": n} for n in names]}],
            "routing": {"strategy": "round_robin", "health": {"interval": 0.2}},
            "privacy": {"audit_log": str(self.audit_path)},
        }
        self.config_path.write_text(yaml.safe_dump(config))

    def hangup(self) -> None:
        assert self.gateway is not None
        self.gateway.process.send_signal(signal.SIGHUP)

    def ready_backends(self) -> set[str]:
        return set(httpx.get(self.url + "/readyz", timeout=2).json()["backends"])

    def wait_for_backends(self, names: set[str], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.ready_backends() != names:
            assert time.monotonic() < deadline, f"backends stayed {self.ready_backends()}, not {names}"
            time.sleep(0.05)

    def log_events(self) -> list[dict[str, Any]]:
        assert self.gateway is not None
        return self.gateway.log_events()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    fakes = {name: FakeOllama(models=["llama3.2"], loaded=["llama3.2"]) for name in ("a", "b", "c")}
    with ExitStack() as stack:
        servers = {name: stack.enter_context(serve(fake.app)) for name, fake in fakes.items()}
        served = Served(fakes, servers, tmp_path)
        served.write_config(["a", "b"])
        served.gateway = stack.enter_context(
            gateway_process(["--config", str(served.config_path)], served.log_path)
        )
        yield served


def test_a_reload_swaps_the_pool_without_dropping_the_stream_in_flight(served: Served) -> None:
    for fake in served.fakes.values():
        fake.default = SLOW
    stream = StreamInBackground(served.url, CHAT)
    assert stream.started.wait(5)
    gone = stream.backend
    stays = "b" if gone == "a" else "a"
    served.write_config([stays, "c"])
    served.hangup()
    served.wait_for_backends({stays, "c"})
    assert stream.running(), "the reload came after the stream ended; the test proves nothing"
    # Up is not yet known to hold the model: that takes a round of /api/ps, done once a second starts.
    wait_for(lambda: sum(path == "/api/ps" for path, _ in served.fakes["c"].requests) >= 2, 5)

    for fake in served.fakes.values():
        fake.default = Reply(content="quick")
    chats_on_gone = len(served.fakes[gone].chat_bodies())
    answered = [httpx.post(served.url + "/v1/chat/completions", json=CHAT, timeout=5) for _ in range(6)]
    assert [r.status_code for r in answered] == [200] * 6
    assert {r.headers["x-phoenix-backend"] for r in answered} == {stays, "c"}
    assert len(served.fakes[gone].chat_bodies()) == chats_on_gone

    stream.join(10)
    assert not stream.running()
    assert stream.events[-1] == "[DONE]"
    assert stream.text() == SLOW.content

    samples = scrape(served.url)
    assert sample(samples, "gateway_backend_up", backend="c") == 1
    assert not [
        labels for name, labels in samples if name == "gateway_backend_up" and ("backend", gone) in labels
    ]
    total = sum(v for (name, _), v in samples.items() if name == "gateway_requests_total")
    assert total == 7  # the counters lived through the reload
    report = verify(served.audit_path)
    assert report.ok and report.records == 7
    reloaded = [e for e in served.log_events() if e.get("event") == "config reloaded"]
    assert reloaded and reloaded[0]["added"] == ["c"] and reloaded[0]["removed"] == [gone]


def test_a_broken_config_is_refused_and_the_running_one_stays(served: Served) -> None:
    served.config_path.write_text("backends: [unclosed\n")
    served.hangup()
    deadline = time.monotonic() + 10
    while not any(
        e.get("event") == "config reload failed; the running config stays" for e in served.log_events()
    ):
        assert time.monotonic() < deadline, "the failed reload was not logged"
        time.sleep(0.05)
    failed = next(e for e in served.log_events() if e.get("event", "").startswith("config reload failed"))
    assert "not valid YAML" in failed["error"]
    assert served.ready_backends() == {"a", "b"}
    answer = httpx.post(served.url + "/v1/chat/completions", json=CHAT, timeout=5)
    assert answer.status_code == 200

    served.write_config(["a", "b", "c"])  # a good config after the bad one is taken
    served.hangup()
    served.wait_for_backends({"a", "b", "c"})


def wait_for_failed_reload(served: Served, count: int = 1) -> dict[str, Any]:
    """The `count`th `config reload failed` line, once it is logged."""
    event = "config reload failed; the running config stays"
    wait_for(lambda: sum(e.get("event") == event for e in served.log_events()) >= count, timeout=10)
    failed = [e for e in served.log_events() if e.get("event") == event]
    assert len(failed) >= count, "the failed reload was not logged"
    return failed[count - 1]


def test_a_redis_url_whose_password_is_not_percent_encoded_is_refused_without_logging_it(
    served: Served,
) -> None:
    password = "Kq9vLr2Tz8Wm/4Xc="
    config = yaml.safe_load(served.config_path.read_text())
    config["rate_limits"] = {"redis_url": f"redis://default:{password}@127.0.0.1:6379/0"}
    served.config_path.write_text(yaml.safe_dump(config))
    served.hangup()
    failed = wait_for_failed_reload(served)
    assert "rate_limits.redis_url: not a Redis URL" in failed["error"]
    log = served.log_path.read_text()
    assert not [password[i : i + 4] for i in range(len(password) - 3) if password[i : i + 4] in log]
    assert httpx.post(served.url + "/v1/chat/completions", json=CHAT, timeout=5).status_code == 200


def test_requests_in_flight_on_a_removed_instance_finish_there(served: Served) -> None:
    for name in ("a", "b"):
        served.fakes[name].default = Reply(content=f"from {name}", delay_first=1.5)
    with ThreadPoolExecutor(1) as pool:
        unary = pool.submit(httpx.post, served.url + "/v1/chat/completions", json=CHAT, timeout=20)
        wait_for(lambda: sum(len(served.fakes[n].chat_bodies()) for n in ("a", "b")) == 1)
        stream = StreamInBackground(served.url, CHAT)
        wait_for(lambda: all(served.fakes[n].chat_bodies() for n in ("a", "b")))
        assert all(served.fakes[n].chat_bodies() for n in ("a", "b")), "a request is not in flight"
        served.write_config(["c"])  # both instances go while their answers are on the way
        served.hangup()
        served.wait_for_backends({"c"})
        assert stream.running() and not unary.done(), "the answers came before the reload"
        answer = unary.result(timeout=20)
    stream.join(20)

    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == f"from {answer.headers['x-phoenix-backend']}"
    assert stream.events[-1] == "[DONE]"
    assert stream.text() == f"from {stream.backend}"
    assert {answer.headers["x-phoenix-backend"], stream.backend} == {"a", "b"}
    assert not [e for e in served.log_events() if e.get("event") == "internal error"]


def test_a_request_failing_on_a_removed_instance_is_retried_on_one_that_stays(served: Served) -> None:
    served.fakes["a"].default = Reply(status=500, delay_first=1.5)
    served.fakes["b"].default = Reply(content="from b")
    with ThreadPoolExecutor(1) as pool:
        for _ in range(3):  # round robin: the first or the second goes to a
            pending = pool.submit(httpx.post, served.url + "/v1/chat/completions", json=CHAT, timeout=20)
            wait_for(lambda: pending.done() or bool(served.fakes["a"].chat_bodies()))  # noqa: B023
            if not pending.done():
                break
        assert served.fakes["a"].chat_bodies() and not pending.done(), "no request in flight on a"
        served.write_config(["b"])
        served.hangup()
        served.wait_for_backends({"b"})
        chats_on_b = len(served.fakes["b"].chat_bodies())
        answer = pending.result(timeout=20)

    assert answer.status_code == 200, answer.text
    assert answer.headers["x-phoenix-backend"] == "b"
    assert len(served.fakes["b"].chat_bodies()) == chats_on_b + 1
    assert not [e for e in served.log_events() if e.get("event") == "internal error"]


def test_the_idle_connections_to_a_removed_instance_are_closed(tmp_path: Path) -> None:
    """Ollama's server never closes an idle keep-alive connection (FaultyOllama does not either):
    the gateway must, or a backend a reload removed keeps its connections open for good."""
    config_path = tmp_path / "gateway.yaml"

    def write_config(fakes: list[FaultyOllama]) -> None:
        backends = [{"name": f"o{i}", "type": "ollama", "base_url": f.url} for i, f in enumerate(fakes)]
        deployments = [{"backend": b["name"], "model": "llama3.2"} for b in backends]
        config = {"backends": backends, "models": [{"name": "llama3.2", "deployments": deployments}]}
        config_path.write_text(yaml.safe_dump(config))

    def open_connections(fake: FaultyOllama) -> int:
        return sum(1 for connection in fake.connections if connection.closed_at is None)

    stays, gone = FaultyOllama(), FaultyOllama()
    with stays.running(), gone.running():
        write_config([stays, gone])
        with gateway_process(["--config", str(config_path)], tmp_path / "stderr.log") as gateway:
            for fake in (stays, gone):  # answers that overlap, so that each needs a connection
                fake.queue(*([sleep(0.5), *ok(stream=False)] for _ in range(8)))
            chat_url = gateway.url + "/v1/chat/completions"
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(lambda _: httpx.post(chat_url, json=CHAT, timeout=10), range(16)))
            assert [answer.status_code for answer in answers] == [200] * 16
            assert open_connections(gone) >= 4, "the burst left too few connections to prove anything"

            write_config([stays])
            gateway.process.send_signal(signal.SIGHUP)
            wait_for(lambda: open_connections(gone) == 0, 2 * http1.IDLE_SECONDS + 2)
            assert open_connections(gone) == 0
            assert httpx.post(chat_url, json=CHAT, timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("args", "applied"),
    [([], True), (["--workers", "2"], True), (["--log-level", "warning"], False)],
    ids=["one-worker", "two-workers", "pinned"],
)
def test_a_reload_applies_server_log_level_and_names_the_server_keys_that_need_a_restart(
    args: list[str], applied: bool, tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    config_path = tmp_path / "gateway.yaml"

    def write(**server: Any) -> None:
        config = {
            "server": server,
            "backends": [{"name": "ollama", "type": "ollama", "base_url": fake_ollama[1].url}],
            "models": [{"name": "llama3.2", "deployments": [{"backend": "ollama"}]}],
        }
        config_path.write_text(yaml.safe_dump(config))

    write(log_level="warning")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "PROMETHEUS_"))}
    workers = 2 if "--workers" in args else 1
    metrics = tmp_path / "metrics"
    if workers > 1:
        metrics.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    log = tmp_path / "stderr.log"
    with gateway_process(["--config", str(config_path), *args], log, env) as gateway:
        if workers > 1:  # a worker still starting would read the new file, and have nothing to reload
            wait_for_workers(metrics, workers)
        for _ in range(3):
            assert httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        assert not [e for e in gateway.log_events() if e.get("event") == "request"]
        write(log_level="info", shutdown_timeout=5)
        gateway.process.send_signal(signal.SIGHUP)
        restart = "config reloaded, but these keys take effect only at a restart"
        wait_for(lambda: sum(e.get("event") == restart for e in gateway.log_events()) == workers, 15)
        warned = [e for e in gateway.log_events() if e.get("event") == restart]
        assert [e["keys"] for e in warned] == [["server.shutdown_timeout"]] * workers
        for _ in range(3):
            assert httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        if applied:  # a request's line is written just after its answer
            wait_for(lambda: sum(e.get("event") == "request" for e in gateway.log_events()) == 3)
        records = [e for e in gateway.log_events() if e.get("event") == "request"]
        pinned = [e for e in gateway.log_events() if e.get("event", "").startswith("server.log_level is not")]
    assert (len(records), len(pinned)) == ((3, 0) if applied else (0, 1))


def hangup_disposition(pid: int) -> str:
    """'ignored', 'caught' or 'default': what process `pid` does with SIGHUP, from /proc."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    bit = 1 << (signal.SIGHUP - 1)
    if int(fields["SigIgn"], 16) & bit:
        return "ignored"
    return "caught" if int(fields["SigCgt"], 16) & bit else "default"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_while_serve_is_starting_does_not_end_it(
    workers: str, tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backends": [{"name": "ollama", "type": "ollama", "base_url": fake_ollama[1].url}],
                "models": [{"name": "llama3.2", "deployments": [{"backend": "ollama"}]}],
            }
        )
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "PROMETHEUS_"))}
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", workers]
    process = subprocess.Popen([*command, "--port", str(port)], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while (seen := hangup_disposition(process.pid)) == "default" and time.monotonic() < deadline:
            time.sleep(0.005)
        # The launcher holds SIGHUP off before the imports, not only once the app has its handler.
        assert seen == "ignored"
        signals = 0
        while time.monotonic() < deadline:
            process.send_signal(signal.SIGHUP)  # all through the start, until the gateway answers
            signals += 1
            time.sleep(0.05)
            assert process.poll() is None, f"SIGHUP number {signals} ended the gateway as it started"
            with suppress(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
                break
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=10)
        assert answer.status_code == 200
        assert signals > 3 and process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_with_two_workers_a_removed_backend_leaves_the_metrics(served: Served, tmp_path: Path) -> None:
    """Each worker's gauges live in files the workers share, where a series cannot be removed: a
    removed backend must not stay in /metrics as it last was (down, firing its alert for good)."""
    served.servers["b"].stop()  # b goes down, then the config drops it
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "PROMETHEUS_"))}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    log = tmp_path / "two-workers.log"
    with gateway_process(["--config", str(served.config_path), "--workers", "2"], log, env) as gateway:
        wait_for_workers(metrics, 2)

        def b_is_down() -> bool:
            return scrape(gateway.url).get(("gateway_backend_up", (("backend", "b"),))) == 0

        wait_for(b_is_down)
        assert b_is_down()

        served.write_config(["a"])
        gateway.process.send_signal(signal.SIGHUP)
        wait_for(lambda: sum(e.get("event") == "config reloaded" for e in gateway.log_events()) == 2, 15)
        assert sum(e.get("event") == "config reloaded" for e in gateway.log_events()) == 2

        after = scrape(gateway.url)
        assert sample(after, "gateway_backend_up", backend="a") == 1
        assert not [labels for name, labels in after if ("backend", "b") in labels and name in (
            "gateway_backend_up", "gateway_inflight_requests")]  # fmt: skip
    assert "Warning" not in log.read_text()
