"""Load shapes: how many users (closed model) or iterations per second (open model) a group wants at
time t, and how fast users may be added.

A profile names a shape under a group's `shape`:

- `constant` (the default): the group's `users` or `arrival_rate` for the whole run.
- `stages`: k6-style ramps, `[{duration: 30s, target: 50}, ...]`, linear from the previous target
  (the group's `users`/`arrival_rate`, or `start`) to each stage's target.
- `steps`: the ACA-Py mediator test's step shape: every `step_time` add `users_per_step` users up to
  `max_users`, spawning at `spawn_fraction` of the current target per second.
- `callable`: `module:function` called with (t, base) once a second — seconds into the run and the
  group's `users`/`arrival_rate` (0 if unset); it returns a number, a mapping `{target, spawn_rate}`,
  a `(target, spawn_rate)` tuple, or None when the group is done.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.durations import Duration


@dataclass(frozen=True)
class ShapePoint:
    """What a shape asks for at one instant."""

    target: float
    """Users (closed model) or iterations per second (open model)."""
    spawn_rate: float | None = None
    """Users added per second at most; None means at once."""


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def at(self, t: float, base: float) -> ShapePoint | None:  # pragma: no cover - abstract
        """The target at `t` seconds into the run; None once the shape is finished."""
        raise NotImplementedError

    def length(self) -> float | None:
        """How long the shape lasts by itself, if it ends."""
        return None


class ConstantShape(_Shape):
    """The group's `users` or `arrival_rate`, all run long."""

    type: Literal["constant"] = "constant"

    def at(self, t: float, base: float) -> ShapePoint | None:
        return ShapePoint(base)


class Stage(BaseModel):
    """One ramp: reach `target` linearly over `duration`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    duration: Duration
    target: float = Field(ge=0)


class StagesShape(_Shape):
    """k6-style ramping stages."""

    type: Literal["stages"]
    stages: list[Stage] = Field(min_length=1)
    start: float | None = Field(default=None, ge=0)
    """The value before the first stage; defaults to the group's users/arrival_rate, else 0."""

    def at(self, t: float, base: float) -> ShapePoint | None:
        prev = self.start if self.start is not None else base
        elapsed = 0.0
        for stage in self.stages:
            if t < elapsed + stage.duration:
                frac = (t - elapsed) / stage.duration if stage.duration > 0 else 1.0
                return ShapePoint(prev + (stage.target - prev) * frac)
            elapsed += stage.duration
            prev = stage.target
        return None

    def length(self) -> float | None:
        return sum(s.duration for s in self.stages)


class StepsShape(_Shape):
    """Add `users_per_step` users every `step_time`, up to `max_users` (closed model only)."""

    type: Literal["steps"]
    step_time: Duration = Field(gt=0)
    users_per_step: int = Field(ge=1)
    max_users: int = Field(ge=1)
    spawn_fraction: float = Field(default=0.5, gt=0)
    """Spawn rate as a fraction of the current target per second (the mediator test's SPAWN_PCT)."""
    time_limit: Duration | None = None

    def at(self, t: float, base: float) -> ShapePoint | None:
        if self.time_limit is not None and t > self.time_limit:
            return None
        step = math.floor(t / self.step_time) + 1
        users = min(step * self.users_per_step, self.max_users)
        return ShapePoint(users, users * self.spawn_fraction)

    def length(self) -> float | None:
        return self.time_limit


class CallableShape(_Shape):
    """A Python function `module:function(t, base) -> number | {target, spawn_rate} | None`."""

    type: Literal["callable"]
    function: str

    @field_validator("function")
    @classmethod
    def _importable(cls, value: str) -> str:
        resolve_callable(value)
        return value

    def at(self, t: float, base: float) -> ShapePoint | None:
        result = resolve_callable(self.function)(t, base)
        if result is None:
            return None
        if isinstance(result, dict):
            return ShapePoint(float(result["target"]), result.get("spawn_rate"))
        if isinstance(result, tuple):
            return ShapePoint(float(result[0]), result[1] if len(result) > 1 else None)
        return ShapePoint(float(result))


def resolve_callable(spec: str) -> Callable[..., Any]:
    """Import `package.module:attribute`; ValueError with the reason if it cannot be found."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, TypeError for '.relative', or the module's own failure
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    try:
        func = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(func):
        raise ValueError(f"{spec!r} is not callable")
    return func  # type: ignore[no-any-return,unused-ignore]


Shape = Annotated[
    ConstantShape | StagesShape | StepsShape | CallableShape,
    Field(discriminator="type"),
]
"""A pydantic field type for any load shape."""
