"""The balancer's ranking and bookkeeping, with a hand-driven clock: strategies, models, warmth,
affinity, health and in-flight caps."""

from __future__ import annotations

import asyncio
import itertools
import tracemalloc
from collections import Counter
from typing import Any

import pytest

from gateway.balancer import Balancer
from gateway.config import parse_config
from gateway.errors import RateLimited, UpstreamUnavailable
from gateway.metrics import Metrics
from gateway.policy import Target

MODEL = "llama3.2:latest"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def balancer(n: int = 3, clock: Clock | None = None, **routing: Any) -> tuple[Balancer, list[Target]]:
    backends: list[dict[str, Any]] = [{"name": f"o{i}", "type": "ollama"} for i in range(n)]
    for backend, weight in zip(backends, routing.pop("weights", [1] * n), strict=True):
        backend["weight"] = weight
    for backend, cap in zip(backends, routing.pop("caps", [None] * n), strict=True):
        backend["max_inflight"] = cap
    config = parse_config(
        {
            "backends": backends,
            "models": [
                {"name": "m", "deployments": [{"backend": b["name"], "model": MODEL} for b in backends]}
            ],
            "routing": routing,
        },
        "test",
    )
    targets = [Target(b["name"], MODEL) for b in backends]
    return Balancer(config, Metrics(), clock=clock or Clock()), targets


def firsts(b: Balancer, targets: list[Target], rounds: int, affinity: str | None = None) -> Counter[str]:
    return Counter(b.order(targets, affinity)[0].backend for _ in range(rounds))


def test_round_robin_takes_turns() -> None:
    b, targets = balancer(strategy="round_robin")
    assert [b.order(targets)[0].backend for _ in range(6)] == ["o0", "o1", "o2", "o0", "o1", "o2"]


def test_weighted_gives_each_instance_its_weight_in_every_round() -> None:
    b, targets = balancer(strategy="weighted", weights=[1, 3, 6])
    picks = [b.order(targets)[0].backend for _ in range(50)]
    for start in range(0, 50, 10):  # every run of sum-of-weights requests, not just on average
        assert Counter(picks[start : start + 10]) == {"o0": 1, "o1": 3, "o2": 6}, picks


def test_weighted_interleaves_rather_than_sending_bursts() -> None:
    b, targets = balancer(strategy="weighted", weights=[1, 2, 3])
    picks = [b.order(targets)[0].backend for _ in range(12)]
    for cycle in (picks[:6], picks[6:]):  # c b c a b c, not c c c b b a
        assert Counter(cycle) == {"o0": 1, "o1": 2, "o2": 3}, picks
        assert max(len(list(run)) for _, run in itertools.groupby(cycle)) == 1, picks


def test_weighted_owes_no_backlog_to_an_instance_that_was_cold() -> None:
    b, targets = balancer(2, strategy="weighted")
    b.set_models("o0", [MODEL], loaded=[MODEL])
    b.set_models("o1", [MODEL], loaded=[])
    assert {b.order(targets)[0].backend for _ in range(10)} == {"o0"}  # the warm one, while it is
    b.set_models("o1", [MODEL], loaded=[MODEL])
    picks = [b.order(targets)[0].backend for _ in range(6)]
    assert Counter(picks) == {"o0": 3, "o1": 3}, picks  # turns, not ten for o1 to catch up


def test_weighted_ranks_every_instance_for_a_retry() -> None:
    b, targets = balancer(strategy="weighted", weights=[1, 1, 2])
    orders = [[t.backend for t in b.order(targets)] for _ in range(4)]
    assert [order[0] for order in orders].count("o2") == 2
    assert all(sorted(order) == ["o0", "o1", "o2"] for order in orders)  # every instance, once


def test_weighted_keeps_nothing_per_model_name_a_pattern_route_passes_on() -> None:
    """Under `ollama/*` the upstream model is any name a client sends: a long-running gateway must
    not keep something for each one, and the instances still get their weights."""
    b, targets = balancer(strategy="weighted", weights=[1, 2, 3])
    names = (f"typo-{i}" for i in itertools.count())
    tracemalloc.start()
    try:
        for _ in range(5_000):  # the interpreter's free lists fill up first
            b.order([Target(t.backend, next(names)) for t in targets])
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20_000):
            b.order([Target(t.backend, next(names)) for t in targets])
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000, f"{grown} bytes kept for 20,000 model names"
    picks = [b.order([Target(t.backend, next(names)) for t in targets])[0].backend for _ in range(6)]
    assert Counter(picks) == {"o0": 1, "o1": 2, "o2": 3}


def test_least_inflight_shares_by_weight_and_prefers_the_idle() -> None:
    b, targets = balancer(weights=[1, 1, 2])
    taken = [b.lease(b.order(targets)[0].backend) for _ in range(40)]
    counts = Counter(lease.backend for lease in taken)
    assert counts == {"o0": 10, "o1": 10, "o2": 20}
    for lease in taken:
        if lease.backend == "o1":
            lease.release()
    assert b.order(targets)[0].backend == "o1"


def test_least_inflight_prefers_a_warm_instance_until_its_queue_costs_more_than_a_load() -> None:
    b, targets = balancer(2)
    b.set_models("o0", [MODEL], loaded=[MODEL])
    b.set_models("o1", [MODEL], loaded=[])
    chosen = [b.lease(b.order(targets)[0].backend).backend for _ in range(3)]
    assert chosen == ["o0", "o0", "o0"]  # waiting behind 2 costs as much as a cold load
    assert b.order(targets)[0].backend == "o1"


def test_latency_weighs_the_moving_average_by_the_queue() -> None:
    b, targets = balancer(strategy="latency")
    b.observe_latency("o0", 0.5)
    b.observe_latency("o1", 0.1)
    assert [t.backend for t in b.order(targets)] == ["o1", "o2", "o0"]  # o2 unmeasured: the average
    for _ in range(4):
        b.lease("o1")
    assert b.order(targets)[0].backend == "o2"  # 0.1 s behind 4 requests is worse than 0.3 s
    b.observe_latency("o2", 0.9)
    for _ in range(10):
        b.observe_latency("o1", 2.0)  # the EWMA follows a slowdown
    assert b.order(targets)[0].backend == "o0"


def test_an_instance_without_the_model_is_never_picked() -> None:
    b, targets = balancer(strategy="round_robin")
    b.set_models("o0", ["qwen2.5:0.5b"])
    b.set_models("o1", ["llama3.2:latest"])
    assert set(firsts(b, targets, 30)) == {"o1", "o2"}  # o2: not known yet, so possible
    assert "o0" not in {t.backend for t in b.order(targets)}


def test_when_no_instance_has_the_model_all_are_kept_for_ollamas_404() -> None:
    b, targets = balancer()
    for name in ("o0", "o1", "o2"):
        b.set_models(name, ["qwen2.5:0.5b"])
    assert len(b.order(targets)) == 3


def test_the_warm_instance_is_preferred_over_a_cold_load() -> None:
    b, targets = balancer(strategy="round_robin")
    for name in ("o0", "o1", "o2"):
        b.set_models(name, [MODEL], loaded=[])
    b.set_models("o2", [MODEL], loaded=["llama3.2:latest"])
    assert set(firsts(b, targets, 9)) == {"o2"}
    bare, _ = balancer()
    bare.set_models("o1", ["llama3.2:latest"], loaded=["llama3.2:latest"])
    assert bare.order([Target("o0", "llama3.2"), Target("o1", "llama3.2")])[0].backend == "o1"  # tag implied


def test_a_full_instance_yields_to_one_with_room() -> None:
    b, targets = balancer(strategy="round_robin", caps=[1, None, None])
    b.set_models("o0", [MODEL], loaded=[MODEL])  # warm, but full
    b.lease("o0")
    assert b.order(targets)[0].backend != "o0"


def test_a_conversation_stays_on_its_instance_unless_it_is_much_busier() -> None:
    b, targets = balancer(affinity="prefix")
    homes = {key: b.order(targets, key)[0].backend for key in ("alice|c1", "bob|c2", "carol|c3")}
    assert len(set(homes.values())) > 1
    home = homes["alice|c1"]
    others = [t.backend for t in targets if t.backend != home]
    held = [b.lease(others[0]) for _ in range(5)]  # load elsewhere does not move it
    assert b.order(targets, "alice|c1")[0].backend == home
    held += [b.lease(home), b.lease(home)]  # two more than the idlest: still home
    assert b.order(targets, "alice|c1")[0].backend == home
    held.append(b.lease(home))  # three more: the cache is not worth the wait
    assert b.order(targets, "alice|c1")[0].backend == others[1]
    held.pop().release()
    assert b.order(targets, "alice|c1")[0].backend == home


def test_a_conversation_goes_home_among_instances_with_the_model_in_memory() -> None:
    b, targets = balancer(affinity="prefix")
    keys = [f"k|c{i}" for i in range(60)]
    b.set_models("o0", [MODEL], loaded=[])
    b.set_models("o1", [MODEL], loaded=[MODEL])
    b.set_models("o2", [MODEL], loaded=[MODEL])
    assert {b.order(targets, k)[0].backend for k in keys} == {"o1", "o2"}


def test_affinity_shares_conversations_by_weight() -> None:
    b, targets = balancer(affinity="prefix", weights=[1, 1, 2])
    homes = Counter(b.order(targets, f"k|c{i}")[0].backend for i in range(4000))
    assert homes["o2"] / 4000 == pytest.approx(0.5, abs=0.03)


def test_round_robin_takes_turns_among_the_instances_that_can_serve() -> None:
    b, targets = balancer(strategy="round_robin")
    b.set_models("o1", ["other"])
    assert Counter(b.order(targets)[0].backend for _ in range(300)) == {"o0": 150, "o2": 150}


def test_affinity_is_ignored_without_the_setting() -> None:
    b, targets = balancer(strategy="round_robin")
    assert len(firsts(b, targets, 6, affinity="alice|c1")) == 3


def test_removing_an_instance_moves_only_its_conversations() -> None:
    b4, four = balancer(4, affinity="prefix")
    b3, three = balancer(3, affinity="prefix")
    keys = [f"key|conv{i}" for i in range(2000)]
    before = {k: b4.order(four, k)[0].backend for k in keys}
    after = {k: b3.order(three, k)[0].backend for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "o3" for k in moved)
    assert len(moved) == pytest.approx(500, abs=80)  # about a quarter: o3's share


def test_a_saturated_home_is_skipped_for_the_moment() -> None:
    b, targets = balancer(affinity="prefix", caps=[1, 1, 1])
    home = b.order(targets, "k|c")[0].backend
    lease = b.lease(home)
    assert b.order(targets, "k|c")[0].backend != home
    lease.release()
    assert b.order(targets, "k|c")[0].backend == home


def test_ejection_cooldown_half_open_and_recovery() -> None:
    clock = Clock()
    b, targets = balancer(strategy="round_robin", clock=clock, health={"unhealthy_after": 2, "cooldown": 30})
    b.failed("o0")
    assert b.healthy("o0")  # one failure is not enough
    b.failed("o0")
    assert not b.healthy("o0")
    assert all(b.order(targets)[-1].backend == "o0" for _ in range(6))  # last resort only
    clock.now += 31
    b.probed("o0", ok=True)  # cool-down over and the probe answers: back
    assert b.healthy("o0")


@pytest.mark.anyio
async def test_a_half_open_instance_gets_one_trial_and_a_failed_trial_ejects_it_again() -> None:
    clock = Clock()
    b, targets = balancer(strategy="round_robin", clock=clock, health={"unhealthy_after": 1, "cooldown": 10})
    b.failed("o0")
    clock.now += 11
    assert "o0" in {b.order(targets)[0].backend for _ in range(3)}  # eligible again
    trial = await b.acquire("o0")
    assert all(b.order(targets)[0].backend != "o0" for _ in range(6))  # one trial at a time
    b.failed("o0")
    trial.release()
    assert not b.healthy("o0")
    clock.now += 11
    (await b.acquire("o0")).release()
    b.succeeded("o0")
    assert b.healthy("o0")


def test_an_instance_is_up_for_readiness_once_its_latest_probe_answered_and_while_not_ejected() -> None:
    clock = Clock()
    b, _ = balancer(1, clock, health={"unhealthy_after": 2, "cooldown": 10})
    assert not b.up("o0")  # no probe yet
    b.probed("o0", ok=True)
    assert b.up("o0")
    b.probed("o0", ok=False)
    assert not b.up("o0") and b.healthy("o0")  # one failure does not eject, but it did not answer
    b.probed("o0", ok=True)
    b.failed("o0")
    b.failed("o0")
    assert not b.up("o0")  # ejected by its requests, though its probe answers
    clock.now += 10
    b.probed("o0", ok=True)
    assert b.up("o0")


def test_a_probe_inside_the_cooldown_does_not_end_it() -> None:
    clock = Clock()
    b, _ = balancer(clock=clock, health={"unhealthy_after": 1, "cooldown": 30})
    b.failed("o1")
    clock.now += 5
    b.probed("o1", ok=True)
    assert not b.healthy("o1")


@pytest.mark.anyio
async def test_past_the_cap_a_request_waits_then_gets_a_429() -> None:
    b, _ = balancer(caps=[1, None, None], max_wait=0.5)
    held = await b.acquire("o0")
    with pytest.raises(RateLimited) as caught:
        await b.acquire("o0")
    assert caught.value.http_status == 429
    assert caught.value.headers["retry-after"] == "1"

    async def release_soon() -> None:
        await asyncio.sleep(0.05)
        held.release()

    releaser = asyncio.create_task(release_soon())
    second = await b.acquire("o0")  # waits for the room, does not fail
    await releaser
    assert b.inflight("o0") == 1
    second.release()


@pytest.mark.anyio
async def test_when_every_instance_is_full_a_request_gets_the_first_that_frees_up() -> None:
    b, targets = balancer(3, caps=[1, 1, 1], max_wait=5)
    held = {t.backend: b.lease(t.backend) for t in targets}
    waiting = asyncio.create_task(b.room(b.order(targets)))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    held["o2"].release()  # whichever the request was ranked onto
    ranked = await asyncio.wait_for(waiting, 1)
    assert ranked[0].backend == "o2"
    held["o0"].release()
    held["o1"].release()


@pytest.mark.anyio
async def test_when_no_instance_frees_up_in_time_the_request_gets_a_429() -> None:
    b, targets = balancer(2, caps=[1, 1], max_wait=0.2)
    held = [b.lease(t.backend) for t in targets]
    with pytest.raises(RateLimited, match="backends o0, o1 are all at their limits") as caught:
        await b.room(b.order(targets))
    assert caught.value.headers["retry-after"] == "1"
    for lease in held:
        lease.release()


def pool_config(urls: dict[str, str], **backend: Any) -> Any:
    return parse_config(
        {
            "backends": [{"name": n, "type": "ollama", "base_url": u, **backend} for n, u in urls.items()],
            "models": [{"name": "m", "deployments": [{"backend": n, "model": MODEL} for n in urls]}],
            "routing": {"health": {"unhealthy_after": 1, "cooldown": 30}},
        },
        "test",
    )


def test_a_reload_keeps_what_is_known_about_the_instances_that_stay() -> None:
    metrics = Metrics()
    before = pool_config({"a": "http://h1:1", "b": "http://h2:1", "c": "http://h3:1"})
    b = Balancer(before, metrics, clock=Clock())
    b.failed("a")
    b.observe_latency("b", 0.25)
    b.set_models("b", [MODEL], [MODEL])
    lease_b, lease_c = b.lease("b"), b.lease("c")

    b.reconfigure(pool_config({"a": "http://h1:1", "b": "http://h2:1", "d": "http://h4:1"}, max_inflight=4))

    assert list(b.instances) == ["a", "b", "d"]
    assert not b.healthy("a")
    assert (b.instances["b"].latency, b.instances["b"].loaded, b.inflight("b")) == (
        0.25,
        frozenset([MODEL]),
        1,
    )
    assert b.instances["b"].max_inflight == 4
    assert b.healthy("d") and b.inflight("d") == 0
    lease_b.release()
    lease_c.release()  # on an instance the reload removed: harmless
    assert b.inflight("b") == 0
    exported = metrics.render().decode()
    assert 'gateway_backend_up{backend="d"} 1.0' in exported
    assert 'gateway_backend_up{backend="a"} 0.0' in exported
    assert 'backend="c"' not in exported


@pytest.mark.anyio
async def test_a_request_on_an_instance_a_reload_removed_finishes_and_its_retry_moves_on() -> None:
    b = Balancer(pool_config({"a": "http://h1:1", "b": "http://h2:1", "c": "http://h3:1"}), Metrics())
    targets = [Target(name, MODEL) for name in ("a", "b", "c")]
    lease = await b.acquire("a")
    b.reconfigure(pool_config({"b": "http://h2:1", "c": "http://h3:1"}))
    # what the request still running on `a` reports is ignored
    b.observe_latency("a", 1.0)
    b.failed("a")
    b.succeeded("a")
    lease.release()
    assert {t.backend for t in b.order(targets)} == {"b", "c"}
    with pytest.raises(UpstreamUnavailable, match="backend a was removed") as caught:
        await b.acquire("a")  # a retry ranked before the reload
    assert caught.value.retryable


@pytest.mark.anyio
async def test_a_request_waiting_for_room_on_an_instance_a_reload_removes_moves_on() -> None:
    b = Balancer(pool_config({"a": "http://h1:1", "b": "http://h2:1"}, max_inflight=1), Metrics())
    held = b.lease("a")
    waiting = asyncio.create_task(b.acquire("a"))
    await asyncio.sleep(0.05)
    b.reconfigure(pool_config({"b": "http://h2:1"}, max_inflight=1))
    held.release()
    with pytest.raises(UpstreamUnavailable):
        await asyncio.wait_for(waiting, 1)


def test_a_reload_that_points_a_name_at_another_server_forgets_the_old_one() -> None:
    b = Balancer(pool_config({"a": "http://h1:1", "b": "http://h2:1"}), Metrics(), clock=Clock())
    b.failed("a")
    b.set_models("a", ["other"], [])
    b.reconfigure(pool_config({"a": "http://elsewhere:1", "b": "http://h2:1"}))
    assert b.healthy("a")
    assert b.instances["a"].available is None


@pytest.mark.anyio
async def test_a_reload_that_raises_a_cap_lets_a_waiting_request_in() -> None:
    b = Balancer(pool_config({"a": "http://h1:1", "b": "http://h2:1"}, max_inflight=1), Metrics())
    held = b.lease("a")
    waiting = asyncio.create_task(b.acquire("a"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    b.reconfigure(pool_config({"a": "http://h1:1", "b": "http://h2:1"}, max_inflight=2))
    second = await asyncio.wait_for(waiting, 1)
    assert b.inflight("a") == 2
    held.release()
    second.release()
