"""`serve --workers 2`: two processes answer, and /metrics on either reports both (prometheus_client's
multiprocess mode, its directory set up and cleaned by the gateway)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import StreamInBackground, sample, scrape, wait_for
from tests.fakes.ollama_server import FakeOllama, Reply
from tests.servers import GatewayProcess, ServerThread, free_port, gateway_process, wait_for_workers

pytestmark = pytest.mark.e2e
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@contextmanager
def two_workers_process(
    tmp_path: Path, backend_url: str, env: dict[str, str], **server: Any
) -> Iterator[GatewayProcess]:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": server,
                "backends": [{"name": "ollama", "type": "ollama", "base_url": backend_url}],
                "models": [{"name": "llama3.2", "deployments": [{"backend": "ollama"}]}],
            }
        )
    )
    base = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    args = ["--config", str(config), "--workers", "2"]
    with gateway_process(args, tmp_path / "stderr.log", {**base, **env}) as gateway:
        yield gateway


@contextmanager
def two_workers(tmp_path: Path, backend_url: str, env: dict[str, str]) -> Iterator[str]:
    with two_workers_process(tmp_path, backend_url, env) as gateway:
        yield gateway.url


def test_every_worker_reports_every_request(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"left over from an earlier run")
    with two_workers(tmp_path, fake_ollama[1].url, {"PROMETHEUS_MULTIPROC_DIR": str(directory)}) as url:
        for _ in range(30):  # a new connection each time, so both workers take some
            assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        writers = {path.name for path in directory.glob("counter_*.db")}
        assert "counter_1.db" not in writers  # the stale file was removed at start
        assert len(writers) == 2, writers  # both workers answered, so the merge below is real
        for _ in range(6):
            samples = scrape(url)
            total = sum(v for (name, _), v in samples.items() if name == "gateway_requests_total")
            assert total == 30
            assert sample(samples, "gateway_requests_total", endpoint="chat", model="llama3.2",
                          backend="ollama", status="200") == 30  # fmt: skip
            assert sample(samples, "gateway_inflight_requests", backend="ollama") == 0
            assert sample(samples, "gateway_backend_up", backend="ollama") == 1
    assert directory.is_dir()  # the operator's directory stays


def test_the_gateway_cleans_up_the_directory_it_made(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    with two_workers(tmp_path, fake_ollama[1].url, {"TMPDIR": str(temporary)}) as url:
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        made = list(temporary.glob("phoenix-metrics-*"))
        assert len(made) == 1 and list(made[0].glob("*.db"))
    assert not list(temporary.iterdir())


def events_named(gateway: GatewayProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in gateway.log_events() if e.get("event") == event]


def test_sighup_reloads_each_worker_in_place_without_cutting_a_stream_or_a_broken_file(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    fake, server = fake_ollama
    words = " ".join(f"w{i}" for i in range(80))
    # A stream of about 4 s, past shutdown_timeout: replacing the worker that serves it would cut it.
    fake.default = Reply(content=words, delay_between=0.05)
    with two_workers_process(tmp_path, server.url, {}, shutdown_timeout=1) as gateway:
        stream = StreamInBackground(gateway.url, CHAT)
        assert stream.started.wait(5)
        gateway.process.send_signal(signal.SIGHUP)
        wait_for(lambda: len(events_named(gateway, "config reloaded")) == 2, timeout=15)
        assert len(events_named(gateway, "config reloaded")) == 2  # one line from each worker
        assert stream.running(), "the stream ended before the reload; the test proves nothing"
        stream.join(15)
        assert stream.events[-1] == "[DONE]"
        assert stream.text() == words

        fake.default = Reply(content="quick")
        (tmp_path / "gateway.yaml").write_text("backends: [unclosed\n")
        gateway.process.send_signal(signal.SIGHUP)
        failed = "config reload failed; the running config stays"
        wait_for(lambda: len(events_named(gateway, failed)) == 2, timeout=15)
        assert [e["error"] for e in events_named(gateway, failed)] == [
            f"{tmp_path / 'gateway.yaml'}: not valid YAML at line 2, column 1"
        ] * 2
        for _ in range(6):  # a new connection each time: both workers answer
            assert httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        assert gateway.process.poll() is None
    lines = (tmp_path / "stderr.log").read_text().splitlines()
    assert [line for line in lines if not line.startswith("{")] == []  # no traceback, only JSON lines


def test_a_worker_replaced_while_the_file_is_broken_says_why_it_cannot_start(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    """One worker dies (an OOM kill) while an edit of the file is half done: its replacements
    cannot load it, and say so in a JSON line each, ever more slowly; the other worker keeps
    serving all the while (uvicorn's supervisor used to stop the whole gateway, exit status 0)."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    with two_workers_process(
        tmp_path, fake_ollama[1].url, {"PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    ) as gateway:
        wait_for_workers(metrics, 2)
        worker = int(next(metrics.glob("*.db")).stem.rpartition("_")[2])  # files are named by pid
        (tmp_path / "gateway.yaml").write_text("backends: [unclosed\n")
        os.kill(worker, signal.SIGKILL)
        cannot = "worker cannot start: the config does not load"
        wait_for(lambda: events_named(gateway, cannot), timeout=15)
        [first, *_] = events_named(gateway, cannot)
        assert first["error"] == f"{tmp_path / 'gateway.yaml'}: not valid YAML at line 2, column 1"
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            assert httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
            time.sleep(0.1)
        assert gateway.process.poll() is None
        pauses = [
            e["pause"]
            for e in events_named(
                gateway, "a worker exited soon after it started; replacing it after a pause"
            )
        ]
        # Each replacement waits twice as long as the one before (without a pause, one started
        # as soon as the supervisor saw the last one gone, about every 1.5 s, for as long as the
        # file stays broken).
        assert len(pauses) >= 2, pauses
        assert all(later == 2 * earlier for earlier, later in itertools.pairwise(pauses)), pauses
    lines = (tmp_path / "stderr.log").read_text().splitlines()
    assert [line for line in lines if not line.startswith("{")] == []  # no traceback, only JSON lines


def test_when_no_worker_can_start_again_the_gateway_stops_with_exit_status_1(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    """Both workers die while the file is broken: none serves, and rather than hold connections
    no one will answer, the gateway exits 1, for its service manager to restart it (where the
    broken file is then named at start)."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    with two_workers_process(
        tmp_path, fake_ollama[1].url, {"PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    ) as gateway:
        wait_for_workers(metrics, 2)
        (tmp_path / "gateway.yaml").write_text("backends: [unclosed\n")
        for path in metrics.glob("*.db"):
            with suppress(ProcessLookupError):
                os.kill(int(path.stem.rpartition("_")[2]), signal.SIGKILL)
        assert gateway.process.wait(timeout=20) == 1
        assert events_named(gateway, "no worker can start; stopping")


def refused_app() -> object:
    """An app factory that uvicorn itself finds broken: its STARTUP_FAILURE (exit status 3)."""
    raise TypeError("not an app")


def test_workers_uvicorn_finds_broken_stop_the_gateway_with_exit_status_1() -> None:
    """uvicorn's supervisor stops every worker when one exits with its STARTUP_FAILURE: the
    gateway then exits 1, not 0 as if it had been asked to stop."""
    program = (  # in a process of its own: the supervisor takes the signals
        "import sys; from gateway.supervisor import serve_workers; sys.exit(serve_workers("
        f"'tests.e2e.test_workers:refused_app', factory=True, workers=2, port={free_port()},"
        " log_level='critical'))"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr.decode()[-2000:]


def test_workers_stop_when_the_main_process_is_killed(
    tmp_path: Path, fake_ollama: tuple[FakeOllama, ServerThread]
) -> None:
    """Killed (an OOM kill, `kill -9`), the main process cannot stop its workers: they stop by
    themselves, rather than serve on unsupervised and hold the port a new `serve` needs."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    with two_workers_process(
        tmp_path, fake_ollama[1].url, {"PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    ) as gateway:
        wait_for_workers(metrics, 2)
        workers = {int(path.stem.rpartition("_")[2]) for path in metrics.glob("*.db")}
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait(timeout=10)

        def running() -> set[int]:
            return {pid for pid in workers if Path(f"/proc/{pid}").exists() and not zombie(pid)}

        wait_for(lambda: not running(), timeout=10)
        assert running() == set()
        with pytest.raises(httpx.ConnectError):
            httpx.get(gateway.url + "/healthz", timeout=2)
        left = [
            e for e in gateway.log_events() if e.get("event") == "the main process is gone: this worker stops"
        ]
        assert len(left) == 2


def zombie(pid: int) -> bool:
    """Whether the process has ended and waits for its parent to collect it."""
    with suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    return False
