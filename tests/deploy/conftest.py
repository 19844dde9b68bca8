"""The fixture the Dockerfile, compose and Kubernetes tests share."""

from __future__ import annotations

import pytest

from tests.deploy.files import Instruction, runtime_stage


@pytest.fixture(scope="module")
def image() -> list[Instruction]:
    """The runtime (last) stage of the Dockerfile."""
    return runtime_stage()
