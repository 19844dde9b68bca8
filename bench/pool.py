"""Which routing strategy gives the lowest time to first token on a pool of Ollama instances.

A discrete-event simulation in virtual time (nothing sleeps) that drives the real
`gateway.balancer.Balancer`. Each request is placed with `order(...)[0]`; it takes a `lease` when
the instance has room under `max_inflight` (else it waits at the gateway, as `acquire` would, but
never gives up) and releases it when the answer ends. The balancer learns what the gateway would:
every `routing.health.interval` seconds (10 s by default) each instance's models and the ones in
memory (`set_models`, as from /api/tags and /api/ps, so it lags reality), and each request's time
to first token (`observe_latency`).

The pool model, kept simple on purpose:

- An instance has a generation rate and a prompt-eval rate (tokens/s, for one request alone) and
  `slots` parallel slots (OLLAMA_NUM_PARALLEL); further requests queue FIFO at the instance. The
  busy slots share its compute: with k of them computing, each runs at (1 + BATCH_GAIN * (k - 1)) / k
  of its solo speed, whether it is evaluating the prompt or generating. Model size does not change
  the rates.
- An instance holds some models and keeps at most `max_loaded` in memory. A request for one that is
  not loaded waits for it to load (`load_seconds`, per model; other slots keep computing), after
  evicting the least recently used model that no request is using. If every loaded model is in use,
  the head of the queue waits, and everything behind it (Ollama's scheduler does the same).
- A KV prefix cache: an instance remembers the conversations of its last `--prefixes` started
  requests (by default one per slot, as Ollama's runner keeps one cache per slot) and forgets a
  model's when it is evicted. A follow-up turn that starts where its conversation is cached
  evaluates only its new tokens, otherwise the whole conversation so far.
- Time to first token = waiting (at the gateway and at the instance) + model load + prompt eval of
  the uncached tokens; the first token itself and the network are free.

The workload, the same for every strategy: conversations arrive as a Poisson process, each on one
of three models of uneven popularity and with several turns; a follow-up is sent a think time after
the previous answer ends, with the whole conversation as its prompt. Sizes and think times come from
a seeded generator. The load is the request rate over the pool's capacity, taken as full-context
prompts with every slot busy and no cache or cold loads.

    .venv/bin/python bench/pool.py [--requests 3000] [--seed 7] [--load 0.7 0.9] [--prefixes N]

CPU-only and in-process; at most 20000 requests per run.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.balancer import Balancer, Lease  # noqa: E402
from gateway.config import Config, parse_config  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.policy import Target  # noqa: E402

MAX_REQUESTS = 20_000
BATCH_GAIN = 0.5  # two busy slots give 1.5 times the throughput of one
EPSILON = 1e-9  # seconds of work treated as done


@dataclass(frozen=True)
class Model:
    name: str
    popularity: float  # share of conversations
    load_seconds: float  # cold load into memory


@dataclass(frozen=True)
class Machine:
    name: str
    token_rate: float  # generation, tokens/s for one request alone
    prompt_rate: float  # prompt eval, tokens/s for one request alone
    slots: int
    max_loaded: int
    models: tuple[str, ...]  # on disk
    preloaded: tuple[str, ...]  # in memory at the start


@dataclass(frozen=True)
class Routing:
    label: str
    strategy: str
    affinity: str = "none"
    max_inflight: int | None = None


MODELS = (
    Model("llama3.2:3b", 0.6, 2.0),
    Model("llama3.1:8b", 0.3, 4.0),
    Model("qwen2.5:14b", 0.1, 6.0),
)
LOAD_SECONDS = {model.name: model.load_seconds for model in MODELS}
EVERY_MODEL = tuple(model.name for model in MODELS)
POOL = (
    Machine("fast-a", 60.0, 600.0, 2, 2, EVERY_MODEL, ("llama3.2:3b",)),
    Machine("fast-b", 60.0, 600.0, 2, 2, EVERY_MODEL, ("llama3.1:8b",)),
    Machine("slow", 25.0, 250.0, 2, 1, ("llama3.2:3b", "llama3.1:8b"), ("llama3.2:3b",)),
)
ROUTINGS = (
    Routing("round_robin", "round_robin"),
    Routing("weighted", "weighted"),
    Routing("latency", "latency"),
    Routing("least_inflight (default)", "least_inflight"),
    Routing("round_robin + affinity", "round_robin", "prefix"),
    Routing("least_inflight + affinity", "least_inflight", "prefix"),
    Routing("least_inflight, max_inflight 2", "least_inflight", "none", 2),
    Routing("least_inflight + affinity, max_inflight 2", "least_inflight", "prefix", 2),
)


# ---- the workload ----


@dataclass(frozen=True)
class Turn:
    new_tokens: int  # prompt tokens this turn adds: system prompt and first message, or a follow-up
    output_tokens: int
    think_seconds: float  # from the previous answer's end to this turn; 0 for the first turn


@dataclass(frozen=True)
class Conversation:
    ident: int
    model: str
    gap: float  # from the previous conversation's start to this one's, at one conversation a second
    turns: tuple[Turn, ...]

    def prompts(self) -> list[int]:
        """Each turn's prompt tokens: the whole conversation up to and including its new message."""
        sizes: list[int] = []
        context = 0
        for turn in self.turns:
            context += turn.new_tokens
            sizes.append(context)
            context += turn.output_tokens
        return sizes


def clipped(value: float, low: int, high: int) -> int:
    return max(low, min(high, round(value)))


def workload(seed: int, requests: int) -> list[Conversation]:
    rng = random.Random(seed)
    conversations: list[Conversation] = []
    total = 0
    while total < requests:
        count = min(1 + int(rng.expovariate(1 / 3.0)), 12, requests - total)
        turns = tuple(
            Turn(
                new_tokens=clipped(rng.lognormvariate(6.2, 0.6), 50, 4000)
                if index == 0
                else clipped(rng.lognormvariate(4.5, 0.8), 5, 2000),
                output_tokens=clipped(rng.lognormvariate(5.3, 0.6), 10, 1500),
                think_seconds=0.0 if index == 0 else 2.0 + rng.expovariate(1 / 20.0),
            )
            for index in range(count)
        )
        model = rng.choices(EVERY_MODEL, weights=[m.popularity for m in MODELS])[0]
        conversations.append(Conversation(len(conversations), model, rng.expovariate(1.0), turns))
        total += count
    return conversations


def mean(values: list[float] | list[int]) -> float:
    return sum(values) / len(values)


def capacity(prompt: float, output: float) -> float:
    """Requests/s the pool serves with every slot busy, for requests of these mean sizes."""
    return sum(
        (1 + BATCH_GAIN * (m.slots - 1)) / (prompt / m.prompt_rate + output / m.token_rate) for m in POOL
    )


# ---- the simulated instances ----


@dataclass
class Job:
    conversation: Conversation
    turn: int
    context: int  # prompt tokens: the whole conversation so far
    arrived: float
    lease: Lease | None = None  # taken when it is sent to the instance
    started: float = 0.0  # when it took a slot
    ready_at: float = 0.0  # when its model is in memory
    prompt_left: float = 0.0  # seconds of solo compute to the first token
    output_left: float = 0.0  # seconds of solo compute from the first token to the end
    first_token: float | None = None

    @property
    def model(self) -> str:
        return self.conversation.model

    @property
    def output_tokens(self) -> int:
        return self.conversation.turns[self.turn].output_tokens


@dataclass
class Server:
    """One simulated Ollama instance, and the requests waiting for it at the gateway."""

    machine: Machine
    prefixes: int
    at_gateway: deque[Job] = field(default_factory=deque)  # no room under max_inflight yet
    queue: deque[Job] = field(default_factory=deque)  # sent, waiting for a slot
    running: list[Job] = field(default_factory=list)
    loaded: OrderedDict[str, float] = field(default_factory=OrderedDict)  # model -> ready; LRU first
    cache: OrderedDict[int, tuple[str, int]] = field(default_factory=OrderedDict)  # conv -> model, tokens
    updated: float = 0.0
    version: int = 0  # bumped whenever its next wake-up is planned again
    loads: int = 0
    cache_hits: int = 0
    served: int = 0

    def computing(self, now: float) -> list[Job]:
        return [job for job in self.running if job.ready_at <= now + EPSILON]

    def speed(self, now: float) -> float:
        busy = len(self.computing(now))
        return (1 + BATCH_GAIN * (busy - 1)) / busy if busy else 0.0

    def advance(self, now: float) -> None:
        """Run the computing jobs from the last update to `now`, at that interval's speed."""
        if now > self.updated:
            work = (now - self.updated) * self.speed(self.updated)
            for job in self.computing(self.updated):
                on_prompt = min(work, job.prompt_left)
                job.prompt_left -= on_prompt
                job.output_left -= work - on_prompt
        self.updated = now

    def start_ready(self, now: float) -> None:
        """Start queued requests, in order, while slots are free and their model can be had."""
        while self.queue and len(self.running) < self.machine.slots:
            job = self.queue[0]
            if job.model not in self.loaded:
                if len(self.loaded) >= self.machine.max_loaded:
                    in_use = {other.model for other in self.running}
                    idle = [model for model in self.loaded if model not in in_use]
                    if not idle:
                        return
                    self.evict(idle[0])
                self.loaded[job.model] = now + LOAD_SECONDS[job.model]
                self.loads += 1
            self.loaded.move_to_end(job.model)
            self.queue.popleft()
            job.started = now
            job.ready_at = max(now, self.loaded[job.model])
            cached = self.cache.pop(job.conversation.ident, None)
            uncached = job.context
            if cached is not None:
                uncached -= cached[1]
                self.cache_hits += 1
            job.prompt_left = uncached / self.machine.prompt_rate
            job.output_left = job.output_tokens / self.machine.token_rate
            self.cache[job.conversation.ident] = (job.model, job.context + job.output_tokens)
            while len(self.cache) > self.prefixes:
                self.cache.popitem(last=False)
            self.running.append(job)

    def evict(self, model: str) -> None:
        del self.loaded[model]
        for ident in [ident for ident, (cached, _) in self.cache.items() if cached == model]:
            del self.cache[ident]

    def next_wake(self, now: float) -> float | None:
        """The next model load, first token or end among the running requests."""
        speed = self.speed(now)
        times = [job.ready_at for job in self.running if job.ready_at > now + EPSILON]
        for job in self.computing(now):
            left = job.prompt_left if job.prompt_left > EPSILON else job.output_left
            times.append(now + max(left, 0.0) / speed)
        return min(times, default=None)

    def in_memory(self, now: float) -> list[str]:
        return [model for model, ready in self.loaded.items() if ready <= now]


# ---- one run ----


@dataclass
class Results:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    waited: list[float] = field(default_factory=list)  # arrival to taking a slot


def pool_config(routing: Routing) -> Config:
    backends = [
        {
            "name": m.name,
            "type": "ollama",
            "weight": round(m.token_rate),
            "max_inflight": routing.max_inflight,
        }
        for m in POOL
    ]
    models = [{"name": name, "deployments": [{"backend": m.name} for m in POOL]} for name in EVERY_MODEL]
    routing_section = {"strategy": routing.strategy, "affinity": routing.affinity}
    return parse_config({"backends": backends, "models": models, "routing": routing_section}, "bench")


class Simulation:
    def __init__(
        self,
        routing: Routing,
        conversations: list[Conversation],
        rate: float,
        prefixes: int | None,
    ) -> None:
        self.now = 0.0
        self.config = pool_config(routing)
        self.balancer = Balancer(self.config, Metrics(), clock=lambda: self.now)
        self.servers = {m.name: Server(m, prefixes or m.slots) for m in POOL}
        for server in self.servers.values():
            for model in server.machine.preloaded:
                server.loaded[model] = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.sequence = itertools.count()
        self.results = Results()
        self.pending = sum(len(c.turns) for c in conversations)
        start = 0.0
        for conversation in conversations:
            start += conversation.gap / rate
            self.at(start, self.arrival(conversation, 0, 0))

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (when, next(self.sequence), action))

    def run(self) -> None:
        self.refresh()
        while self.events:
            self.now, _, action = heapq.heappop(self.events)
            action()

    def refresh(self) -> None:
        """What the gateway's background loop reads from /api/tags and /api/ps."""
        for name, server in self.servers.items():
            self.balancer.set_models(name, server.machine.models, server.in_memory(self.now))
        if self.pending:
            self.at(self.now + self.config.routing.health.interval, self.refresh)

    def arrival(self, conversation: Conversation, turn: int, context: int) -> Callable[[], None]:
        def arrive() -> None:
            targets = [Target(name, conversation.model) for name in self.servers]
            key = f"bench|conversation-{conversation.ident}"
            backend = self.balancer.order(targets, key)[0].backend
            job = Job(conversation, turn, context + conversation.turns[turn].new_tokens, self.now)
            server = self.servers[backend]
            if self.balancer.instances[backend].saturated:
                server.at_gateway.append(job)
            else:
                self.send(server, job)

        return arrive

    def send(self, server: Server, job: Job) -> None:
        job.lease = self.balancer.lease(server.machine.name)
        server.advance(self.now)
        server.queue.append(job)
        self.step(server)

    def wake(self, server: Server, version: int) -> Callable[[], None]:
        def woken() -> None:
            if version == server.version:
                server.advance(self.now)
                self.step(server)

        return woken

    def step(self, server: Server) -> None:
        """Settle first tokens and finished requests, start what can start, plan the next wake-up."""
        name = server.machine.name
        for job in server.computing(self.now):
            if job.first_token is None and job.prompt_left <= EPSILON:
                job.first_token = self.now
                self.results.ttft.append(self.now - job.arrived)
                self.balancer.observe_latency(name, self.now - job.arrived)
            if job.first_token is not None and job.output_left <= EPSILON:
                server.running.remove(job)
                server.served += 1
                assert job.lease is not None  # taken when it was sent
                job.lease.release()
                self.balancer.succeeded(name)
                self.results.total.append(self.now - job.arrived)
                self.results.waited.append(job.started - job.arrived)
                self.pending -= 1
                self.follow_up(job)
        while server.at_gateway and not self.balancer.instances[name].saturated:
            job = server.at_gateway.popleft()
            job.lease = self.balancer.lease(name)
            server.queue.append(job)
        server.start_ready(self.now)
        server.version += 1
        wake = server.next_wake(self.now)
        if wake is not None:
            self.at(wake, self.wake(server, server.version))

    def follow_up(self, job: Job) -> None:
        turns = job.conversation.turns
        if job.turn + 1 < len(turns):
            arrive = self.arrival(job.conversation, job.turn + 1, job.context + job.output_tokens)
            self.at(self.now + turns[job.turn + 1].think_seconds, arrive)


# ---- the report ----


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def row(routing: Routing, sim: Simulation, follow_ups: int) -> str:
    results = sim.results
    servers = sim.servers.values()
    hits = sum(s.cache_hits for s in servers)
    cells = (
        routing.label,
        f"{mean(results.ttft):.2f} s",
        f"{p95(results.ttft):.2f} s",
        f"{mean(results.total):.2f} s",
        str(sum(s.loads for s in servers)),
        str(sum(wait > sim.config.routing.max_wait for wait in results.waited)),
        f"{hits} ({100 * hits / max(follow_ups, 1):.0f}%)",
        "/".join(f"{100 * s.served / len(results.total):.0f}" for s in servers),
    )
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--load", type=float, nargs="+", default=[0.7, 0.9], help="shares of capacity")
    parser.add_argument("--prefixes", type=int, help="conversations each KV cache holds (default: slots)")
    args = parser.parse_args()
    requests = max(1, min(args.requests, MAX_REQUESTS))

    started = time.perf_counter()
    conversations = workload(args.seed, requests)
    prompt = mean([size for c in conversations for size in c.prompts()])
    output = mean([turn.output_tokens for c in conversations for turn in c.turns])
    full = capacity(prompt, output)
    print(
        f"{requests} requests in {len(conversations)} conversations (seed {args.seed}); mean prompt"
        f" {prompt:.0f} tokens (whole conversation), mean answer {output:.0f} tokens"
    )
    for m in POOL:
        print(
            f"- {m.name}: {m.token_rate:.0f} tok/s, prompt {m.prompt_rate:.0f} tok/s, {m.slots} slots,"
            f" {m.max_loaded} model(s) in memory, has {', '.join(m.models)}; weight {round(m.token_rate)}"
        )
    defaults = pool_config(ROUTINGS[0]).routing
    print(f"capacity {full:.3f} requests/s; /api/ps read every {defaults.health.interval:.0f} s")
    columns = (
        "strategy", "mean TTFT", "p95 TTFT", "mean total", "cold loads",
        f"waited > {defaults.max_wait:.0f} s", "prefix-cache hits",
        "served % (" + "/".join(m.name for m in POOL) + ")",
    )  # fmt: skip
    for load in args.load:
        rate = load * full * len(conversations) / requests  # conversations a second
        print(f"\nload {load:.0%}: {load * full:.3f} requests/s\n")
        print("| " + " | ".join(columns) + " |")
        print("|---" * len(columns) + "|")
        for routing in ROUTINGS:
            sim = Simulation(routing, conversations, rate, args.prefixes)
            sim.run()
            print(row(routing, sim, requests - len(conversations)))
    print(f"{time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
