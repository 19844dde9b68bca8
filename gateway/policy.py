"""Model name -> an ordered plan of targets. Decides before any I/O; imports no provider.

Exact names and aliases win; then patterns (`ollama/*`, `*`) in config order, where the part
matched by `*` is the upstream model name. A model unknown to every route is a 404 that lists
close names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from fnmatch import fnmatchcase

from gateway.config import Config, ModelRoute
from gateway.errors import ModelNotFound


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
        # Upstream names backends are known to serve (filled from their inventories); requests for
        # them get their own metrics label, everything else under a pattern shares the pattern's.
        self.known: set[str] = set()

    @property
    def routes(self) -> list[ModelRoute]:
        seen: dict[str, ModelRoute] = {route.name: route for route in self._exact.values()}
        return [*seen.values(), *self._patterns]

    def plan(self, name: str) -> Plan:
        route = self._exact.get(name)
        if route is not None:
            targets = tuple(Target(d.backend, d.model or route.name) for d in route.deployments)
            return Plan(name, route.name, route.name, targets, tuple(route.fallbacks))
        for route in self._patterns:
            if fnmatchcase(name, route.name):
                upstream = _wildcard_part(route.name, name)
                if not upstream:
                    continue
                targets = tuple(Target(d.backend, d.model or upstream) for d in route.deployments)
                label = name if upstream in self.known else route.name
                return Plan(name, route.name, label, targets, tuple(route.fallbacks))
        raise ModelNotFound(self._not_found_message(name))

    def _not_found_message(self, name: str) -> str:
        names = sorted({*self._exact, *self.known})
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        message = f"The model '{name}' does not exist on this gateway."
        if close:
            message += " Did you mean: " + ", ".join(close) + "?"
        elif names:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            message += f" Known models: {shown}."
        return message

    def public_name(self, route: ModelRoute, upstream: str) -> str | None:
        """The client-facing name under which `route` serves `upstream`, or None for exact routes."""
        if not route.is_pattern:
            return None
        prefix, _, suffix = route.name.partition("*")
        return f"{prefix}{upstream}{suffix}"
