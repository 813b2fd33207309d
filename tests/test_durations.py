"""Durations (`250ms`, `1h30m`) and the random distributions of think and service times."""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from harness.distributions import Constant, Distribution, Exponential, LogNormal, Uniform, coerce_distribution
from harness.durations import Duration, format_duration, parse_duration

DIST = TypeAdapter(Distribution)

# -- parse_duration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1m30s", 90.0),
        ("1d", 86400.0),
        ("500us", 0.0005),
        (" 1h 30m ", 5400.0),
        ("1H", 3600.0),
        ("90", 90.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("0s", 0.0),
        (90, 90.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    result = parse_duration(value)
    assert result == pytest.approx(seconds)
    assert type(result) is float


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        "-1",
        "-1s",
        "abc",
        "5 parsecs",
        "5s parsecs",
        "1m30",
        "1h-30m",
        "s",
        "",
        "   ",
        "nan",
        "inf",
        float("nan"),
        float("inf"),
        10**400,  # an int too large for a float
        "1e400",
        True,
        False,
        None,
        [1],
        {"s": 1},
    ],
)
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_duration_field_type() -> None:
    adapter = TypeAdapter(Duration)
    assert adapter.validate_python("2m") == 120.0
    assert adapter.validate_python(3) == 3.0
    with pytest.raises(ValidationError, match="expected a duration"):
        adapter.validate_python("5 parsecs")


# -- format_duration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.25, "250ms"),
        (0.9994, "999ms"),
        (0.9996, "1.0s"),  # not "1000ms"
        (1, "1s"),
        (1.5, "1.5s"),
        (42, "42s"),
        (59.94, "59.9s"),
        (59.96, "1m00s"),  # not "60.0s"
        (60, "1m00s"),
        (185, "3m05s"),
        (3599.4, "59m59s"),
        (3600, "1h00m"),
        (3720, "1h02m"),
        (90000, "25h00m"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 10 * 86400))
def test_format_then_parse_round_trips_within_display_precision(seconds: float) -> None:
    text = format_duration(seconds)
    back = parse_duration(text)
    tolerance = 0.0005 if seconds < 1 else 0.05 if seconds < 60 else 0.5 if seconds < 3600 else 60
    assert abs(back - seconds) <= tolerance + 1e-9, (seconds, text, back)


# -- distributions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("250ms", Constant(value=0.25)),
        (2, Constant(value=2.0)),
        (0.5, Constant(value=0.5)),
        ({"value": "1s"}, Constant(value=1.0)),
        ({}, Constant(value=0.0)),
        ({"type": "constant", "value": "2m"}, Constant(value=120.0)),
        ({"type": "uniform", "min": "1s", "max": "2s"}, Uniform(type="uniform", min=1.0, max=2.0)),
        ({"type": "uniform", "min": 1, "max": 1}, Uniform(type="uniform", min=1.0, max=1.0)),
        ({"type": "exponential", "mean": "100ms"}, Exponential(type="exponential", mean=0.1)),
        (
            {"type": "lognormal", "median": "10ms", "p99": "1s"},
            LogNormal(type="lognormal", median=0.01, p99=1.0),
        ),
    ],
)
def test_distribution_forms(value: Any, expected: Any) -> None:
    assert DIST.validate_python(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"type": "uniform", "min": 2, "max": 1}, "max (1.0s) must be >= min (2.0s)"),
        ({"type": "lognormal", "median": 1, "p99": 0.5}, "p99 (0.5s) must be >= median (1.0s)"),
        ({"type": "lognormal", "median": 0, "p99": 1}, "greater than 0"),
        ({"type": "exponential", "mean": 0}, "greater than 0"),
        ({"type": "gaussian", "mean": 1}, "gaussian"),
        ({"type": "uniform", "min": 1}, "max"),
        ({"type": "constant", "value": 1, "jitter": 2}, "Extra inputs"),
        ({"value": 1, "jitter": 2}, "type"),
        ("5 parsecs", "5 parsecs"),
        (True, "valid dictionary"),
        (None, "valid dictionary"),
        (-1, "finite number >= 0"),
    ],
)
def test_bad_distributions_are_rejected(value: Any, fragment: str) -> None:
    with pytest.raises((ValidationError, ValueError)) as info:
        DIST.validate_python(value)
    assert fragment in str(info.value)


def test_coerce_distribution_leaves_typed_mappings_alone() -> None:
    typed = {"type": "uniform", "min": 1, "max": 2}
    assert coerce_distribution(typed) is typed
    assert coerce_distribution("1s") == {"type": "constant", "value": 1.0}
    assert coerce_distribution(True) is True  # not a number here: the model rejects it


def _percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def test_lognormal_has_the_requested_median_and_p99() -> None:
    dist = LogNormal(type="lognormal", median=0.1, p99=1.0)
    rng = random.Random(12345)
    samples = sorted(dist.sample(rng) for _ in range(10_000))
    assert _percentile(samples, 50) == pytest.approx(0.1, rel=0.06)
    assert _percentile(samples, 99) == pytest.approx(1.0, rel=0.2)
    assert statistics.fmean(samples) == pytest.approx(dist.mean(), rel=0.1)
    assert dist.sigma == pytest.approx(math.log(10) / 2.3263478740408408)
    assert min(samples) > 0


def test_lognormal_max_caps_samples() -> None:
    dist = LogNormal(type="lognormal", median=0.1, p99=1.0, max=0.2)
    rng = random.Random(1)
    samples = [dist.sample(rng) for _ in range(5_000)]
    assert max(samples) == 0.2
    assert sum(s == 0.2 for s in samples) > 1000  # P(X > 2 * median) is about 27%


def test_lognormal_with_equal_median_and_p99_is_constant() -> None:
    dist = LogNormal(type="lognormal", median=0.5, p99=0.5)
    rng = random.Random(3)
    assert all(dist.sample(rng) == pytest.approx(0.5) for _ in range(100))


def test_uniform_stays_in_bounds() -> None:
    dist = Uniform(type="uniform", min=0.05, max=0.15)
    rng = random.Random(7)
    samples = [dist.sample(rng) for _ in range(10_000)]
    assert min(samples) >= 0.05 and max(samples) <= 0.15
    assert min(samples) < 0.051 and max(samples) > 0.149  # the whole range is used
    assert statistics.fmean(samples) == pytest.approx(dist.mean(), rel=0.02)
    assert dist.mean() == pytest.approx(0.1)


def test_exponential_mean_and_cap() -> None:
    dist = Exponential(type="exponential", mean=0.2)
    rng = random.Random(99)
    samples = [dist.sample(rng) for _ in range(10_000)]
    assert statistics.fmean(samples) == pytest.approx(0.2, rel=0.05)
    assert dist.mean() == 0.2
    # median of an exponential is mean * ln 2
    assert _percentile(sorted(samples), 50) == pytest.approx(0.2 * math.log(2), rel=0.06)
    capped = Exponential(type="exponential", mean=0.2, max=0.1)
    assert max(capped.sample(rng) for _ in range(2000)) == 0.1


def test_sampling_is_reproducible_with_a_seed() -> None:
    dist = LogNormal(type="lognormal", median=0.01, p99=0.2)
    first = [dist.sample(random.Random(5)) for _ in range(3)]
    assert first == [dist.sample(random.Random(5)) for _ in range(3)]
    assert Constant(value=0.3).sample(random.Random(0)) == 0.3
    assert Constant(value=0.3).mean() == 0.3
