"""Load shapes: constant, k6-style stages, the mediator test's steps, and user callables."""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from harness.errors import ProfileError
from harness.profile import load_profile_text
from harness.shapes import (
    CallableShape,
    ConstantShape,
    Shape,
    ShapePoint,
    StagesShape,
    StepsShape,
    resolve_callable,
)

SHAPE = TypeAdapter(Shape)
_counter = itertools.count()


def shape(spec: dict[str, Any]) -> Any:
    return SHAPE.validate_python(spec)


# -- constant --------------------------------------------------------------------------------------


def test_constant_is_the_base_all_run_long() -> None:
    constant = shape({"type": "constant"})
    assert isinstance(constant, ConstantShape)
    for t in (0.0, 1.5, 3600.0, 1e9):
        assert constant.at(t, 12) == ShapePoint(12, None)
    assert constant.length() is None
    assert ConstantShape().type == "constant"


# -- stages ----------------------------------------------------------------------------------------

STAGES = {
    "type": "stages",
    "stages": [
        {"duration": "10s", "target": 10},
        {"duration": 20, "target": 30},
        {"duration": "5s", "target": 0},
    ],
}


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0.0, 0.0),  # starts at the base (0 here)
        (5.0, 5.0),  # halfway up the first ramp
        (9.99, 9.99),
        (10.0, 10.0),  # boundary: end of stage 1 == start of stage 2
        (20.0, 20.0),  # halfway through stage 2 (10 -> 30)
        (30.0, 30.0),
        (32.5, 15.0),  # halfway down (30 -> 0)
        (34.9, 0.6),
    ],
)
def test_stages_interpolate_linearly(t: float, expected: float) -> None:
    stages = shape(STAGES)
    assert isinstance(stages, StagesShape)
    point = stages.at(t, 0)
    assert point is not None
    assert point.target == pytest.approx(expected)
    assert point.spawn_rate is None


@pytest.mark.parametrize("t", [35.0, 35.001, 100.0])
def test_stages_end_after_their_total_length(t: float) -> None:
    stages = shape(STAGES)
    assert stages.length() == 35.0
    assert stages.at(t, 0) is None


def test_stages_start_from_base_or_start() -> None:
    ramp = {"type": "stages", "stages": [{"duration": 10, "target": 20}]}
    assert shape(ramp).at(0, 4).target == 4  # the group's users
    assert shape(ramp).at(5, 4).target == pytest.approx(12)
    with_start = shape({**ramp, "start": 10})
    assert with_start.at(0, 4).target == 10  # `start` wins over the base
    assert with_start.at(5, 4).target == pytest.approx(15)


def test_zero_length_stage_jumps() -> None:
    jump = shape(
        {"type": "stages", "stages": [{"duration": 0, "target": 50}, {"duration": 10, "target": 100}]}
    )
    assert jump.at(0, 0).target == 50
    assert jump.at(5, 0).target == pytest.approx(75)
    assert jump.length() == 10


@settings(max_examples=100, deadline=None)
@given(
    stages=st.lists(
        st.tuples(st.floats(0, 100), st.floats(0, 1000)),
        min_size=1,
        max_size=5,
    ),
    base=st.floats(0, 1000),
    frac=st.floats(0, 1.2),
)
def test_stages_stay_between_neighbouring_targets(
    stages: list[tuple[float, float]], base: float, frac: float
) -> None:
    ramp = shape({"type": "stages", "stages": [{"duration": d, "target": x} for d, x in stages]})
    total = sum(d for d, _ in stages)
    assert ramp.length() == pytest.approx(total)
    t = total * frac
    point = ramp.at(t, base)
    if t >= total:
        assert point is None
        return
    assert point is not None
    values = [base, *(x for _, x in stages)]
    assert min(values) - 1e-6 <= point.target <= max(values) + 1e-6


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "stages", "stages": []},
        {"type": "stages", "stages": [{"duration": 10, "target": -1}]},
        {"type": "stages", "stages": [{"duration": "ten", "target": 1}]},
        {"type": "stages", "stages": [{"duration": 10}]},
        {"type": "stages", "stages": [{"duration": 10, "target": 1, "extra": 1}]},
        {"type": "stages", "stages": [{"duration": 10, "target": 1}], "start": -1},
        {"type": "stages"},
        {"type": "sine"},
        {"stages": [{"duration": 10, "target": 1}]},  # no type: not a constant shape with extras
    ],
)
def test_bad_stages_are_rejected(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        shape(spec)


# -- steps (the ACA-Py mediator test) -------------------------------------------------------------------

STEPS = {
    "type": "steps",
    "step_time": "30s",
    "users_per_step": 10,
    "max_users": 45,
    "spawn_fraction": 0.5,
    "time_limit": "2m",
}


def mediator_tick(
    t: float, step_time: float, per_step: int, max_users: int, fraction: float, limit: float | None
) -> tuple[int, float] | None:
    """The mediator load test's LoadTestShape.tick(), written out."""
    if limit is not None and t > limit:
        return None
    step = math.floor(t / step_time) + 1
    users = min(step * per_step, max_users)
    return users, users * fraction


@pytest.mark.parametrize(
    ("t", "users", "spawn"),
    [
        (0.0, 10, 5.0),
        (29.999, 10, 5.0),
        (30.0, 20, 10.0),
        (59.0, 20, 10.0),
        (60.0, 30, 15.0),
        (90.0, 40, 20.0),
        (119.9, 40, 20.0),
        (120.0, 45, 22.5),  # capped at max_users; still running at exactly the time limit
    ],
)
def test_steps_follow_the_mediator_test(t: float, users: int, spawn: float) -> None:
    steps = shape(STEPS)
    assert isinstance(steps, StepsShape)
    assert steps.at(t, 0) == ShapePoint(users, spawn)


@pytest.mark.parametrize("t", [120.001, 121.0, 1e6])
def test_steps_end_after_the_time_limit(t: float) -> None:
    steps = shape(STEPS)
    assert steps.length() == 120.0
    assert steps.at(t, 0) is None


def test_steps_without_time_limit_run_forever_at_max() -> None:
    steps = shape({k: v for k, v in STEPS.items() if k != "time_limit"})
    assert steps.length() is None
    assert steps.at(1e6, 0) == ShapePoint(45, 22.5)
    assert shape({"type": "steps", "step_time": 1, "users_per_step": 1, "max_users": 1}).spawn_fraction == 0.5


@settings(max_examples=150, deadline=None)
@given(
    t=st.floats(0, 10_000),
    step_time=st.floats(0.1, 600),
    per_step=st.integers(1, 500),
    max_users=st.integers(1, 10_000),
    fraction=st.floats(0.01, 2),
    limit=st.none() | st.floats(0, 10_000),
)
def test_steps_match_the_mediator_formula(
    t: float, step_time: float, per_step: int, max_users: int, fraction: float, limit: float | None
) -> None:
    steps = StepsShape(
        type="steps",
        step_time=step_time,
        users_per_step=per_step,
        max_users=max_users,
        spawn_fraction=fraction,
        time_limit=limit,
    )
    expected = mediator_tick(t, step_time, per_step, max_users, fraction, limit)
    point = steps.at(t, 123)  # the base does not matter to steps
    if expected is None:
        assert point is None
    else:
        assert point is not None
        assert (point.target, point.spawn_rate) == pytest.approx(expected)
        assert 1 <= point.target <= max_users


@pytest.mark.parametrize(
    "change",
    [
        {"step_time": 0},
        {"step_time": "-1s"},
        {"users_per_step": 0},
        {"max_users": 0},
        {"spawn_fraction": 0},
        {"time_limit": "soon"},
        {"surprise": 1},
    ],
)
def test_bad_steps_are_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        shape({**STEPS, **change})


# -- callable --------------------------------------------------------------------------------------

HELPERS = """
calls = []

def linear(t, base):
    calls.append((t, base))
    return base + t

def as_mapping(t, base):
    return {"target": 3, "spawn_rate": 1.5}

def mapping_without_spawn(t, base):
    return {"target": "7"}

def as_tuple(t, base):
    return (4, 2.0)

def finite(t, base):
    return None if t >= 10 else 1

not_callable = 5
"""


@pytest.fixture
def helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throw-away module of shape functions on sys.path; yields its name."""
    name = f"shape_helpers_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text(HELPERS, encoding="utf-8")
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('boom at import')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop(f"{name}_broken", None)


def test_callable_returning_a_number(helpers: str) -> None:
    linear = shape({"type": "callable", "function": f"{helpers}:linear"})
    assert isinstance(linear, CallableShape)
    assert linear.at(2.5, 10) == ShapePoint(12.5, None)
    assert linear.length() is None
    assert sys.modules[helpers].calls == [(2.5, 10)]  # called with (t, base)


def test_callable_returning_mapping_or_tuple(helpers: str) -> None:
    assert shape({"type": "callable", "function": f"{helpers}:as_mapping"}).at(0, 0) == ShapePoint(3.0, 1.5)
    no_spawn = shape({"type": "callable", "function": f"{helpers}:mapping_without_spawn"})
    assert no_spawn.at(0, 0) == ShapePoint(7.0)
    assert shape({"type": "callable", "function": f"{helpers}:as_tuple"}).at(0, 0) == ShapePoint(4.0, 2.0)


def test_callable_returning_none_is_done(helpers: str) -> None:
    finite = shape({"type": "callable", "function": f"{helpers}:finite"})
    assert finite.at(9.9, 0) == ShapePoint(1.0)
    assert finite.at(10, 0) is None


def test_callable_shape_in_a_profile(helpers: str) -> None:
    text = f"""
name: shaped
groups:
  g:
    simulator: http
    shape: {{type: callable, function: "{helpers}:linear"}}
    options: {{base_url: "http://127.0.0.1:1", requests: [{{url: /}}]}}
"""
    group = load_profile_text(text, environ={}).profile.groups["g"]
    assert group.users is None and group.mode == "closed" and group.base == 0.0
    assert group.shape.at(3, group.base) == ShapePoint(3.0)


@pytest.mark.parametrize(
    ("function", "fragment"),
    [
        ("linear", "expected 'module:function'"),
        ("{m}:", "expected 'module:function'"),
        (":linear", "expected 'module:function'"),
        ("no_such_module_for_shapes:f", "cannot import 'no_such_module_for_shapes'"),
        ("{m}:missing", "has no attribute 'missing'"),
        ("{m}:not_callable", "is not callable"),
        (".relative:f", "cannot import '.relative'"),
        ("{m}_broken:f", "boom at import"),
    ],
)
def test_bad_callable_specs_are_rejected(helpers: str, function: str, fragment: str) -> None:
    spec = function.format(m=helpers)
    with pytest.raises(ValidationError) as info:
        shape({"type": "callable", "function": spec})
    assert fragment in str(info.value)
    with pytest.raises(ValueError) as direct:
        resolve_callable(spec)
    assert fragment in str(direct.value)


def test_bad_callable_in_a_profile_names_the_field(helpers: str) -> None:
    doc = {
        "name": "shaped",
        "groups": {
            "g": {
                "simulator": "http",
                "users": 1,
                "shape": {"type": "callable", "function": f"{helpers}:missing"},
                "options": {"base_url": "http://127.0.0.1:1", "requests": [{"url": "/"}]},
            }
        },
    }
    with pytest.raises(ProfileError) as info:
        load_profile_text(yaml.safe_dump(doc), "c.yaml", environ={})
    assert info.value.field == "groups.g.shape.function"
    assert "has no attribute 'missing'" in info.value.message
