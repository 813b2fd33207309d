"""Timeline analysis: where did the system under test start to degrade, and with how many users?

The analysis of the LLM-engine seed's `analyzeTimeline.js`, recomputed from a run's stored windows
(so it works for any past run): the run is cut into windows of `window_s` seconds from its start; per
window it reports the users (max), requests, failures, failure %, p50, p95 and timeouts; the
*degradation point* is the first window whose failure % is above `max_failure_pct` or whose p95 is
above `max_p95_ms`; the capacity estimate is 80–100% of the users at that point.

Differences from analyzeTimeline.js, all on purpose:

- Percentiles are merges of the stored HdrHistograms (exact to 0.1%), not nearest-rank over pooled
  samples; only request windows count (iteration errors, kind `error`, are not requests).
- Users are the group workers' reported users, summed over groups, max over the window.
- Windows in which no request completed are left out, as analyzeTimeline.js skips windows with no
  durations.
- **Timeouts**: analyzeTimeline.js counts durations above 55 s. Here a timeout is a *failure whose
  error message says so* ("timeout after 10s", "timed out", "TimeoutError"), whatever the client's
  timeout was. Error messages are stored deduplicated per (group, name, message) with a count and the
  first and last second they were seen, not per second; so an error whose first and last second fall
  in one window is counted exactly, and one that spans several windows is spread over them in
  proportion to the failures of its (group, name) in each second of that span (largest remainder, so
  the total is exact). `timeouts_exact` in the result says whether any spreading happened.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

from harness.metrics import merge_into, new_histogram
from harness.report.csv import histogram_stats, resolve_run, users_per_second
from harness.store import Store

TIMEOUT_MESSAGE = re.compile(r"time[sd]?[\s_-]*out", re.IGNORECASE)
"""An error message that means a timeout: timeout, timed out, time-out, TimeoutError, ReadTimeout."""

CAPACITY_LOW = 0.8
"""The capacity estimate is this fraction of the users at the degradation point, up to all of them."""


def analyze_timeline(
    store: Store,
    run_id: str,
    window_s: int = 60,
    max_failure_pct: float = 10.0,
    max_p95_ms: float = 10_000.0,
) -> dict[str, Any]:
    """The run's timeline and its degradation point.

    Returns `{"run_id", "window_s", "max_failure_pct", "max_p95_ms", "rows": [{t, users, requests,
    failures, failure_pct, p50_ms, p95_ms, timeouts}], "degradation": {t, users, reason} | None,
    "capacity": {low, high} | None, "timeouts_exact"}`, where `t` is the window's start in seconds
    since the run started. `capacity` is None when there is no degradation, or when no users were
    reported at that point (e.g. an open-model group: there, look at the arrival rate instead).
    """
    window_s = int(window_s)
    if window_s < 1:
        raise ValueError(f"window_s must be a whole number of seconds >= 1, got {window_s}")
    run = resolve_run(store, run_id)
    windows = [w for w in store.windows(run.id) if w["kind"] != "error"]
    base = math.floor(run.started_at)
    if windows:
        base = min(base, windows[0]["t"])

    def offset(t: float) -> int:
        return int((int(t) - base) // window_s * window_s)

    buckets: dict[int, dict[str, Any]] = {}
    failures_by_second: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for w in windows:
        b = buckets.get(offset(w["t"]))
        if b is None:
            b = buckets[offset(w["t"])] = {"requests": 0, "failures": 0, "hist": new_histogram()}
        b["requests"] += w["count"]
        b["failures"] += w["failures"]
        merge_into(b["hist"], w["hist"])
        if w["failures"]:
            failures_by_second[(w["group"], w["name"])][w["t"]] += w["failures"]

    users: dict[int, int] = defaultdict(int)
    for t, groups in users_per_second(store, run.id).items():
        o = offset(t)
        users[o] = max(users[o], sum(groups.values()))

    timeouts, exact = _timeouts(store, run.id, failures_by_second, offset)

    rows: list[dict[str, Any]] = []
    degradation: dict[str, Any] | None = None
    for t in sorted(buckets):
        b = buckets[t]
        if not b["requests"]:
            continue
        stats = histogram_stats(b["hist"], (50, 95))
        p50 = stats["percentiles"][50] if stats else 0.0
        p95 = stats["percentiles"][95] if stats else 0.0
        failure_pct = b["failures"] / b["requests"] * 100
        row = {
            "t": t,
            "users": users.get(t, 0),
            "requests": b["requests"],
            "failures": b["failures"],
            "failure_pct": round(failure_pct, 3),
            "p50_ms": round(p50, 3),
            "p95_ms": round(p95, 3),
            "timeouts": timeouts.get(t, 0),
        }
        rows.append(row)
        if degradation is None:
            reasons = []
            if failure_pct > max_failure_pct:
                reasons.append(f"failures {failure_pct:.1f}% > {max_failure_pct:g}%")
            if p95 > max_p95_ms:
                reasons.append(f"p95 {p95:,.0f} ms > {max_p95_ms:,.0f} ms")
            if reasons:
                degradation = {"t": t, "users": row["users"], "reason": " and ".join(reasons)}
    capacity = None
    if degradation is not None and degradation["users"] > 0:
        capacity = {"low": math.floor(CAPACITY_LOW * degradation["users"]), "high": degradation["users"]}
    return {
        "run_id": run.id,
        "window_s": window_s,
        "max_failure_pct": max_failure_pct,
        "max_p95_ms": max_p95_ms,
        "rows": rows,
        "degradation": degradation,
        "capacity": capacity,
        "timeouts_exact": exact,
    }


def _timeouts(
    store: Store,
    run_id: str,
    failures_by_second: dict[tuple[str, str], dict[int, int]],
    offset: Any,
) -> tuple[dict[int, int], bool]:
    """Timeout failures per window (see the module docstring) and whether every one was exact."""
    out: dict[int, int] = defaultdict(int)
    exact = True
    for err in store.errors(run_id):
        if not TIMEOUT_MESSAGE.search(err["message"]):
            continue
        first, last, count = int(err["first_seen"]), int(err["last_seen"]), int(err["count"])
        if offset(first) == offset(last):
            out[offset(first)] += count
            continue
        exact = False
        weights: dict[int, int] = defaultdict(int)
        for t, failures in failures_by_second.get((err["group"], err["name"]), {}).items():
            if first <= t <= last:
                weights[offset(t)] += failures
        for window, share in _spread(count, weights).items():
            out[window] += share
        if not weights:
            out[offset(last)] += count
    return out, exact


def _spread(count: int, weights: dict[int, int]) -> dict[int, int]:
    """`count` split over the keys in proportion to their weights; the shares sum to `count`."""
    total = sum(weights.values())
    if not total:
        return {}
    raw = {k: count * w / total for k, w in weights.items()}
    shares = {k: math.floor(v) for k, v in raw.items()}
    left = count - sum(shares.values())
    for k in sorted(raw, key=lambda k: (shares[k] - raw[k], k))[:left]:
        shares[k] += 1
    return shares


def describe(result: dict[str, Any]) -> list[str]:
    """The verdict as analyzeTimeline.js words it: the degradation window and users, and the capacity."""
    degradation = result.get("degradation")
    if degradation is None:
        return [
            f"No significant degradation detected (no {result['window_s']}s window had failures above "
            f"{result['max_failure_pct']:g}% or p95 above {result['max_p95_ms']:,.0f} ms)"
        ]
    lines = [
        f"Performance degradation detected at T+{degradation['t']}s "
        f"(window {degradation['t']}–{degradation['t'] + result['window_s']}s): {degradation['reason']}",
        f"Users at degradation: ~{degradation['users']}",
    ]
    capacity = result.get("capacity")
    if capacity:
        lines.append(
            f"Estimated capacity: approximately {capacity['low']}–{capacity['high']} concurrent users"
        )
    else:
        lines.append("No capacity estimate: no users were reported in that window (open model?)")
    return lines


AUTO_WINDOWS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)


def auto_window(duration_s: float, max_rows: int = 60) -> int:
    """The smallest round window that cuts a run of `duration_s` into at most `max_rows` windows."""
    for window in AUTO_WINDOWS:
        if duration_s / window <= max_rows:
            return window
    return AUTO_WINDOWS[-1]
