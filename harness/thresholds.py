"""Pass/fail thresholds: `METRIC[SCOPE] OP NUMBER`, evaluated on a run's summary.

    p95_ms < 500                  the whole run
    error_rate[browse] < 0.01     one group
    p99_ms[browse/home] <= 800    one endpoint (group/name)

METRIC is one of the summary's numbers (see `METRICS`); OP is one of < <= > >= == !=.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

METRICS = (
    "requests",
    "failures",
    "error_rate",
    "rps",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "dropped",
)
_OPS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_EXPR = re.compile(
    r"^\s*(?P<metric>[a-z0-9_]+)\s*(?:\[(?P<scope>[^\]]+)\])?\s*(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<value>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True)
class Threshold:
    """One parsed threshold."""

    expr: str
    metric: str
    group: str | None
    name: str | None
    op: str
    limit: float
    abort: bool = False

    def evaluate(self, summary: dict[str, Any]) -> tuple[float | None, bool]:
        """The measured value and whether it passes; a missing scope fails with value None."""
        source = _scope(summary, self.group, self.name)
        if source is None:
            return None, False
        value = source.get(self.metric)
        if value is None:
            return None, False
        return float(value), bool(_OPS[self.op](float(value), self.limit))


def parse_threshold(expr: str, abort: bool = False) -> Threshold:
    """Parse one expression; ValueError saying what is expected."""
    match = _EXPR.match(expr)
    if not match:
        raise ValueError(
            f"cannot read threshold {expr!r}: expected 'METRIC[SCOPE] OP NUMBER', e.g. 'p95_ms < 500'"
        )
    metric = match["metric"]
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} in {expr!r}; known: {', '.join(METRICS)}")
    group = name = None
    if match["scope"]:
        group, _, name_part = match["scope"].strip().partition("/")
        group = group.strip()
        name = name_part.strip() or None
    return Threshold(expr.strip(), metric, group, name, match["op"], float(match["value"]), abort)


def _scope(summary: dict[str, Any], group: str | None, name: str | None) -> dict[str, Any] | None:
    if group is None:
        return summary.get("totals")
    if name is None:
        return (summary.get("group_totals") or {}).get(group)
    for endpoint in summary.get("endpoints", []):
        if endpoint.get("group") == group and endpoint.get("name") == name:
            return dict(endpoint)
    return None


def evaluate_all(thresholds: list[Threshold], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary's `thresholds` list: `{expr, value, ok}` for each."""
    results = []
    for threshold in thresholds:
        value, ok = threshold.evaluate(summary)
        results.append({"expr": threshold.expr, "value": value, "ok": ok, "abort": threshold.abort})
    return results
