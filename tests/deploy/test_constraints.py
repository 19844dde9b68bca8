"""constraints.txt: every dependency pinned, each pin within pyproject.toml's range, and used by
every command that installs the project (the README's two, .ci/run's, the Dockerfile's)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"not a name==version pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in found, f"{name} pinned twice"
        found[name] = match[2]
    return found


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return [Requirement(text) for text in listed]


def test_every_requirement_is_pinned_within_its_range() -> None:
    pinned = pins()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{requirement.name} {pinned[name]} is outside pyproject's {requirement.specifier}"
        )


def test_the_project_itself_is_not_pinned() -> None:
    assert "phoenix-gateway" not in pins()


def test_every_install_command_uses_the_constraints() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv && ")]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pip install" in line]
    docker = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if "pip install" in line]
    assert len(commands) == 2 and len(ci) == 1 and len(docker) == 1
    for line in [*commands, *ci, *docker]:
        assert "pip install -q -c constraints.txt " in line or "pip install -c constraints.txt " in line, line
    assert ci[0] == commands[1], ".ci/run runs exactly the README's test command"
    assert "COPY pyproject.toml README.md constraints.txt ./" in (ROOT / "Dockerfile").read_text()
