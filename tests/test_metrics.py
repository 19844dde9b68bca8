"""Bound metric children update the same values prometheus_client's own methods do."""

from __future__ import annotations

import pytest

from gateway.metrics import Metrics

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
