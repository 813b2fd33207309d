"""Thresholds: `METRIC[SCOPE] OP NUMBER`, parsed and evaluated on a run summary."""

from __future__ import annotations

from typing import Any

import pytest

from harness.thresholds import METRICS, Threshold, evaluate_all, parse_threshold

SUMMARY: dict[str, Any] = {
    "totals": {
        "requests": 1000,
        "failures": 5,
        "error_rate": 0.005,
        "rps": 100.0,
        "p50_ms": 20.0,
        "p95_ms": 250.0,
        "p99_ms": 400.0,
        "max_ms": 900.0,
        "dropped": 0,
    },
    "group_totals": {
        "browse": {"requests": 800, "failures": 40, "error_rate": 0.05, "p95_ms": 300.0},
        "api": {"requests": 200, "failures": 0, "error_rate": 0.0, "p95_ms": 50.0},
    },
    "endpoints": [
        {"group": "browse", "name": "home", "requests": 600, "p99_ms": 800.0},
        {"group": "browse", "name": "GET /search", "requests": 200, "p99_ms": 1200.0},
        {"group": "api", "name": "home", "requests": 200, "p99_ms": 60.0},
    ],
}


@pytest.mark.parametrize(
    ("expr", "metric", "group", "name", "op", "limit"),
    [
        ("p95_ms < 500", "p95_ms", None, None, "<", 500.0),
        ("error_rate[browse] < 0.01", "error_rate", "browse", None, "<", 0.01),
        ("p99_ms[browse/home] <= 800", "p99_ms", "browse", "home", "<=", 800.0),
        ("  p95_ms<5e2  ", "p95_ms", None, None, "<", 500.0),
        ("p99_ms[ browse / GET /search ] > 1", "p99_ms", "browse", "GET /search", ">", 1.0),
        ("rps >= -1.5", "rps", None, None, ">=", -1.5),
        ("requests[browse/] == 800", "requests", "browse", None, "==", 800.0),
        ("failures != +3", "failures", None, None, "!=", 3.0),
    ],
)
def test_parse(expr: str, metric: str, group: str | None, name: str | None, op: str, limit: float) -> None:
    threshold = parse_threshold(expr)
    assert (threshold.metric, threshold.group, threshold.name, threshold.op, threshold.limit) == (
        metric,
        group,
        name,
        op,
        limit,
    )
    assert threshold.expr == expr.strip()
    assert threshold.abort is False
    assert parse_threshold(expr, abort=True).abort is True


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("latency_ms < 5", "unknown metric 'latency_ms'"),
        ("p95 < 5", "unknown metric 'p95'"),
        ("p95_ms <> 5", "cannot read threshold"),
        ("p95_ms < abc", "cannot read threshold"),
        ("p95_ms <", "cannot read threshold"),
        ("< 5", "cannot read threshold"),
        ("P95_MS < 5", "cannot read threshold"),
        ("p95_ms[browse < 5", "cannot read threshold"),
        ("p95_ms[] < 5", "cannot read threshold"),
        ("p95_ms = 5", "cannot read threshold"),
        ("", "cannot read threshold"),
    ],
)
def test_parse_rejects(expr: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_threshold(expr)
    assert fragment in str(info.value)


def test_unknown_metric_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        parse_threshold("latency < 5")
    for metric in METRICS:
        assert metric in str(info.value)


@pytest.mark.parametrize(
    ("expr", "value", "ok"),
    [
        # totals
        ("p95_ms < 300", 250.0, True),
        ("p95_ms < 250", 250.0, False),
        ("p95_ms <= 250", 250.0, True),
        ("p95_ms <= 249.9", 250.0, False),
        ("p95_ms > 249", 250.0, True),
        ("p95_ms > 250", 250.0, False),
        ("p95_ms >= 250", 250.0, True),
        ("p95_ms >= 251", 250.0, False),
        ("p95_ms == 250", 250.0, True),
        ("p95_ms == 251", 250.0, False),
        ("p95_ms != 251", 250.0, True),
        ("p95_ms != 250", 250.0, False),
        ("error_rate < 0.01", 0.005, True),
        ("dropped == 0", 0.0, True),
        ("requests >= 1000", 1000.0, True),
        # one group
        ("error_rate[browse] < 0.01", 0.05, False),
        ("error_rate[api] < 0.01", 0.0, True),
        ("p95_ms[browse] <= 300", 300.0, True),
        # one endpoint
        ("p99_ms[browse/home] <= 800", 800.0, True),
        ("p99_ms[api/home] <= 800", 60.0, True),
        ("p99_ms[browse/GET /search] < 1000", 1200.0, False),
    ],
)
def test_evaluate(expr: str, value: float, ok: bool) -> None:
    assert parse_threshold(expr).evaluate(SUMMARY) == (value, ok)


@pytest.mark.parametrize(
    "expr",
    [
        "p95_ms[checkout] < 500",  # no such group
        "p99_ms[browse/nothing] < 500",  # no such endpoint
        "p99_ms[nogroup/home] < 500",
        "p50_ms[browse] < 500",  # the group has no p50_ms
        "mean_ms < 500",  # totals have no mean_ms
    ],
)
def test_missing_scope_or_metric_fails_without_a_value(expr: str) -> None:
    assert parse_threshold(expr).evaluate(SUMMARY) == (None, False)


def test_summary_without_sections_fails_without_a_value() -> None:
    for expr in ("p95_ms < 500", "p95_ms[browse] < 500", "p95_ms[browse/home] < 500"):
        assert parse_threshold(expr).evaluate({}) == (None, False)
    assert parse_threshold("p95_ms[browse] < 1").evaluate({"group_totals": None}) == (None, False)


def test_evaluate_all() -> None:
    thresholds = [
        parse_threshold("p95_ms < 500"),
        parse_threshold("error_rate[browse] < 0.01", abort=True),
        parse_threshold("p99_ms[x/y] < 1"),
    ]
    assert evaluate_all(thresholds, SUMMARY) == [
        {"expr": "p95_ms < 500", "value": 250.0, "ok": True, "abort": False},
        {"expr": "error_rate[browse] < 0.01", "value": 0.05, "ok": False, "abort": True},
        {"expr": "p99_ms[x/y] < 1", "value": None, "ok": False, "abort": False},
    ]
    assert evaluate_all([], SUMMARY) == []


def test_threshold_is_a_frozen_value() -> None:
    threshold = parse_threshold("p95_ms < 500")
    assert threshold == Threshold("p95_ms < 500", "p95_ms", None, None, "<", 500.0)
    with pytest.raises(AttributeError):
        threshold.limit = 1  # type: ignore[misc]
