"""Random durations used for think times and for the service times of embedded targets.

A distribution is written in a profile as a number or duration string (constant), or as a mapping
with a `type`: `constant`, `uniform`, `exponential` or `lognormal`. Every sample is in seconds.
"""

from __future__ import annotations

import math
import random
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from harness.durations import Duration, parse_duration


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def sample(self, rng: random.Random) -> float:  # pragma: no cover - abstract
        """One value in seconds."""
        raise NotImplementedError

    def mean(self) -> float:  # pragma: no cover - abstract
        """The expected value in seconds."""
        raise NotImplementedError


class Constant(_Dist):
    """Always the same value."""

    type: Literal["constant"] = "constant"
    value: Duration = 0.0

    def sample(self, rng: random.Random) -> float:
        return self.value

    def mean(self) -> float:
        return self.value


class Uniform(_Dist):
    """Uniform between `min` and `max` (Locust's `between`)."""

    type: Literal["uniform"]
    min: Duration
    max: Duration

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}s) must be >= min ({self.min}s)")
        return self

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.min, self.max)

    def mean(self) -> float:
        return (self.min + self.max) / 2


class Exponential(_Dist):
    """Exponential with the given mean, optionally capped at `max` (memoryless arrivals)."""

    type: Literal["exponential"]
    mean_: Duration = Field(alias="mean", gt=0)
    max: Duration | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def sample(self, rng: random.Random) -> float:
        value = rng.expovariate(1.0 / self.mean_)
        return min(value, self.max) if self.max is not None else value

    def mean(self) -> float:
        return self.mean_


class LogNormal(_Dist):
    """Log-normal given its median and its 99th percentile: the usual shape of service times."""

    type: Literal["lognormal"]
    median: Duration = Field(gt=0)
    p99: Duration
    max: Duration | None = None

    @model_validator(mode="after")
    def _ordered(self) -> LogNormal:
        if self.p99 < self.median:
            raise ValueError(f"p99 ({self.p99}s) must be >= median ({self.median}s)")
        return self

    @property
    def sigma(self) -> float:
        """The log-space standard deviation implied by median and p99."""
        return math.log(self.p99 / self.median) / 2.3263478740408408

    def sample(self, rng: random.Random) -> float:
        value = rng.lognormvariate(math.log(self.median), self.sigma)
        return min(value, self.max) if self.max is not None else value

    def mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)


def coerce_distribution(value: Any) -> Any:
    """Let a bare number or duration string stand for a constant distribution."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return {"type": "constant", "value": parse_duration(value)}
    if isinstance(value, dict) and "type" not in value:
        return {"type": "constant", **value} if set(value) <= {"value"} else value
    return value


Distribution = Annotated[
    Annotated[Constant | Uniform | Exponential | LogNormal, Field(discriminator="type")],
    BeforeValidator(coerce_distribution),
]
"""A pydantic field type for a random duration; a bare number or `250ms` means constant."""
