"""Bound metric children update the same values prometheus_client's own methods do; and the
files of several workers' metrics."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gateway.cli import metrics_directory
from gateway.metrics import MULTIPROC_ENV, Metrics, forget_dead_workers

# below the first bound, on bounds (le is inclusive), just above one, past the last finite bound
OBSERVED = [0.0, 0.0001, 0.005, 0.0050001, 0.3, 2.5, 299.0, 300.0, 301.0, 1e9]


def test_a_bound_histogram_fills_the_buckets_prometheus_client_would() -> None:
    ours, theirs = Metrics(), Metrics()
    for value in OBSERVED:
        ours.child(ours.duration, "chat", "m", "b", "false").observe(value)
        theirs.duration.labels("chat", "m", "b", "false").observe(value)
        ours.child(ours.overhead, "chat").observe(value / 1000)
        theirs.overhead.labels("chat").observe(value / 1000)
    assert b'le="0.005",model="m",stream="false"} 3.0' in theirs.render()  # the values reached it
    assert ours.render() == theirs.render()


def test_a_bound_counter_adds_up_and_refuses_to_go_down() -> None:
    ours, theirs = Metrics(), Metrics()
    for amount in (1, 5, 0):
        ours.child(ours.tokens, "m", "b", "prompt").inc(amount)
        theirs.tokens.labels("m", "b", "prompt").inc(amount)
    ours.child(ours.requests, "chat", "m", "b", "200").inc()
    theirs.requests.labels("chat", "m", "b", "200").inc()
    assert b'type="prompt"} 6.0' in theirs.render()
    assert ours.render() == theirs.render()
    with pytest.raises(ValueError):
        ours.child(ours.tokens, "m", "b", "prompt").inc(-1)
    assert ours.render() == theirs.render()


def test_a_new_worker_drops_the_live_gauges_of_workers_that_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid names no process now
    dead, alive = finished.pid, os.getpid()
    names = [
        f"gauge_livesum_{dead}.db",
        f"gauge_liveall_{dead}.db",
        f"counter_{dead}.db",
        f"gauge_livesum_{alive}.db",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    forget_dead_workers()
    # the dead worker's counts stay in the sums; its in-flight requests and backends up go
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [f"counter_{dead}.db", f"gauge_livesum_{alive}.db"]
    )


def test_a_metrics_directory_given_to_one_worker_is_emptied_of_a_previous_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gauge_livesum_1.db").write_bytes(b"")
    (tmp_path / "counter_1.db").write_bytes(b"")
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with metrics_directory(1):
        assert list(tmp_path.iterdir()) == []
