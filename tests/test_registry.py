"""Every simulator and embedded target is registered, documented and tested."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.simulator import Simulator, load_simulator, registered_simulators
from harness.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SIMULATORS = sorted(registered_simulators())


def test_there_are_simulators() -> None:
    assert "http" in SIMULATORS


@pytest.mark.parametrize("name", SIMULATORS)
def test_simulator_is_loadable_and_described(name: str) -> None:
    cls = load_simulator(name)
    assert issubclass(cls, Simulator)
    assert cls.name == name
    assert cls.description and cls.__doc__
    assert cls.iteration is not Simulator.iteration, "a simulator must implement iteration()"


@pytest.mark.parametrize("name", SIMULATORS)
def test_simulator_is_documented_and_tested(name: str) -> None:
    assert f"`{name}`" in README, f"README.md does not mention the `{name}` simulator"
    assert (ROOT / "tests" / f"test_{name}_simulator.py").exists(), f"no tests/test_{name}_simulator.py"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_is_documented_and_tested(name: str) -> None:
    assert TARGETS[name].description
    assert f"`{name}`" in README, f"README.md does not mention the `{name}` target"
    assert name in (ROOT / "tests" / "test_targets.py").read_text(encoding="utf-8")
