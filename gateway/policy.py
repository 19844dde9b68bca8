"""Model name -> an ordered plan of targets, and the privacy filter over it. Pure: no I/O.

Exact names and aliases win; then patterns (`ollama/*`, `*`) in config order, where the part
matched by `*` is the upstream model name. A model unknown to every route is a 404 that lists
close names.

A private request keeps only the targets whose locality is established: a `local: true` backend,
and for Ollama also a model its own inventory lists as not remote (Ollama forwards "cloud" models
to its hosted service). Fallbacks are for public traffic only.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from fnmatch import fnmatchcase

from gateway.config import Backend, Config, ModelRoute
from gateway.errors import ModelNotFound, UpstreamUnavailable
from gateway.schemas import ModelInfo


@dataclass(frozen=True, slots=True)
class Target:
    backend: str
    model: str  # the upstream model name


@dataclass(frozen=True, slots=True)
class Plan:
    requested: str
    route: str  # the configured name that matched (a pattern for pattern routes)
    label: str  # metrics label: configured name, or the requested name when a backend lists it
    targets: tuple[Target, ...]
    fallbacks: tuple[str, ...] = ()
    privacy: str | None = None  # the route's own policy


# What a private request may assume about one target.
LOCAL, CLOUD, MISSING, UNKNOWN = "local", "cloud", "missing", "unknown"


def is_cloud_name(model: str) -> bool:
    return model.endswith(("-cloud", ":cloud"))


def other_name(model: str) -> str | None:
    """Ollama's other name for the same model: `llama3.2` for `llama3.2:latest`, and the other way
    round; None for a name with another tag."""
    if model.endswith(":latest"):
        return model.removesuffix(":latest")
    return None if ":" in model else f"{model}:latest"


def listed_name(names: AbstractSet[str], model: str) -> str | None:
    """`model` among Ollama's names, where `llama3.2` and `llama3.2:latest` are the same model."""
    if model in names:
        return model
    tagged = f"{model}:latest"
    return tagged if ":" not in model and tagged in names else None


def listed(listing: list[ModelInfo], model: str) -> ModelInfo | None:
    name = listed_name({info.id for info in listing}, model)
    return next((info for info in listing if info.id == name), None)


def locality(backend: Backend, model: str, listing: list[ModelInfo] | None) -> str:
    """LOCAL only when established; `listing` is the backend's inventory, None when unreachable."""
    if not backend.local or is_cloud_name(model):
        return CLOUD
    if backend.type != "ollama":
        return LOCAL  # the operator vouches for it (`local: true`)
    if listing is None:
        return UNKNOWN
    info = listed(listing, model)
    if info is None:
        return MISSING
    return CLOUD if info.remote else LOCAL


def local_only(plan: Plan, verdicts: dict[Target, str]) -> Plan | None:
    """The plan cut down to established-local targets, without fallbacks; None when the model has
    no local deployment at all. Raises when local deployments exist but none can be used now."""
    local = tuple(target for target in plan.targets if verdicts[target] == LOCAL)
    if local:
        return Plan(plan.requested, plan.route, plan.label, local, (), plan.privacy)
    unreachable = [t.backend for t in plan.targets if verdicts[t] == UNKNOWN]
    if unreachable:
        raise UpstreamUnavailable(
            f"No local backend for '{plan.requested}' is reachable ({', '.join(unreachable)});"
            " private requests are never sent to a cloud backend."
        )
    missing = [t for t in plan.targets if verdicts[t] == MISSING]
    if missing:
        where = ", ".join(t.backend for t in missing)
        raise ModelNotFound(
            f"The model '{missing[0].model}' is not on the local Ollama instance(s) {where};"
            f" run `ollama pull {missing[0].model}` there. Private requests never go to a cloud backend."
        )
    return None


def not_found(name: str, names: Iterable[str]) -> ModelNotFound:
    """The 404 for `name`, with the close ones among `names` (what the caller may use), else the
    first of them."""
    names = sorted(names)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    message = f"The model '{name}' does not exist on this gateway."
    if close:
        message += " Did you mean: " + ", ".join(close) + "?"
    elif names:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        message += f" Known models: {shown}."
    return ModelNotFound(message)


def _wildcard_part(pattern: str, name: str) -> str:
    prefix, _, suffix = pattern.partition("*")
    return name[len(prefix) : len(name) - len(suffix) if suffix else None]


class Router:
    def __init__(self, config: Config) -> None:
        self._exact: dict[str, ModelRoute] = {}
        self._patterns: list[ModelRoute] = []
        for route in config.models:
            if route.is_pattern:
                self._patterns.append(route)
            else:
                for name in (route.name, *route.aliases):
                    self._exact[name] = route
        # An exact name's plan never changes: made once (plans are immutable)
        self._exact_plans = {name: self._exact_plan(name, route) for name, route in self._exact.items()}
        # Upstream names backends are known to serve (filled from their inventories); requests for
        # them get their own metrics label, everything else under a pattern shares the pattern's.
        self.known: set[str] = set()
        self._listed: dict[str, set[str]] = {}  # the same, by backend: what a 404 may suggest

    def learn(self, backend: str, names: Iterable[str]) -> None:
        """`backend` serves these upstream names (and, for Ollama's `x:latest`, `x` too)."""
        listed = self._listed.setdefault(backend, set())
        for name in names:
            listed.update((name, name.removesuffix(":latest")))
        self.known |= listed

    @property
    def routes(self) -> list[ModelRoute]:
        seen: dict[str, ModelRoute] = {route.name: route for route in self._exact.values()}
        return [*seen.values(), *self._patterns]

    @staticmethod
    def _exact_plan(name: str, route: ModelRoute) -> Plan:
        targets = tuple(Target(d.backend, d.model or route.name) for d in route.deployments)
        return Plan(name, route.name, route.name, targets, tuple(route.fallbacks), route.privacy)

    def plan(self, name: str, visible: Callable[[str], bool] | None = None) -> Plan:
        """`visible`: which names the 404 for an unknown `name` may suggest (the caller's key's)."""
        exact = self._exact_plans.get(name)
        if exact is not None:
            return exact
        for route in self._patterns:
            if fnmatchcase(name, route.name):
                upstream = _wildcard_part(route.name, name)
                if not upstream:
                    continue
                targets = tuple(Target(d.backend, d.model or upstream) for d in route.deployments)
                label = name if upstream in self.known else route.name
                return Plan(name, route.name, label, targets, tuple(route.fallbacks), route.privacy)
        raise not_found(name, filter(visible, self._routable()) if visible else self._routable())

    def _routable(self) -> set[str]:
        """The names a request can use: the exact ones, and what backends list under the patterns."""
        names = set(self._exact)
        for route in self._patterns:
            prefix, _, suffix = route.name.partition("*")
            for deployment in route.deployments:
                if deployment.model is None:  # the name's `*` part is what this backend is asked for
                    listed = self._listed.get(deployment.backend, ())
                    names.update(f"{prefix}{upstream}{suffix}" for upstream in listed)
        return names

    def public_name(self, route: ModelRoute, upstream: str) -> str | None:
        """The client-facing name under which `route` serves `upstream`, or None for exact routes."""
        if not route.is_pattern:
            return None
        prefix, _, suffix = route.name.partition("*")
        return f"{prefix}{upstream}{suffix}"
