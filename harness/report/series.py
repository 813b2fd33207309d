"""Per-second (or per-window) series of a run, merged from stored windows and health rows."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from harness.metrics import merge_into, new_histogram
from harness.store import Store

SERIES_PERCENTILES = (50, 90, 95, 99)


def per_second(
    store: Store,
    run_id: str,
    *,
    window: int = 1,
    by: str = "run",
    include_errors_rows: bool = False,
) -> list[dict[str, Any]]:
    """Rows of `t` (start of each window, epoch seconds), users, requests, failures, rps, failures_s,
    mean/min/max and percentiles in ms — for the whole run (`by="run"`), per group (`by="group"`) or per
    (group, name) (`by="name"`). `window` merges that many seconds into one row.
    """
    if by not in ("run", "group", "name"):
        raise ValueError(f"by must be run, group or name, got {by!r}")
    window = max(1, int(window))
    buckets: dict[tuple[int, str, str], dict[str, Any]] = {}
    for w in store.windows(run_id):
        if w["kind"] == "error" and not include_errors_rows:
            continue
        t0 = w["t"] - (w["t"] % window)
        group = w["group"] if by in ("group", "name") else ""
        name = w["name"] if by == "name" else ""
        key = (t0, group, name)
        b = buckets.get(key)
        if b is None:
            b = buckets[key] = {"requests": 0, "failures": 0, "hist": new_histogram()}
        b["requests"] += w["count"]
        b["failures"] += w["failures"]
        merge_into(b["hist"], w["hist"])
    users = _users(store, run_id, window, by)
    rows = []
    for (t0, group, name), b in sorted(buckets.items()):
        hist = b["hist"]
        row: dict[str, Any] = {"t": t0}
        if by in ("group", "name"):
            row["group"] = group
        if by == "name":
            row["name"] = name
        row["users"] = users.get((t0, group if by != "run" else ""), 0)
        row["requests"] = b["requests"]
        row["failures"] = b["failures"]
        row["rps"] = b["requests"] / window
        row["failures_s"] = b["failures"] / window
        if hist.get_total_count():
            row["mean_ms"] = hist.get_mean_value() / 1000
            row["min_ms"] = hist.get_min_value() / 1000
            row["max_ms"] = hist.get_max_value() / 1000
            values = hist.get_percentile_to_value_dict(list(SERIES_PERCENTILES))
            for p in SERIES_PERCENTILES:
                row[f"p{p}_ms"] = values[p] / 1000
        else:
            row.update(
                {
                    "mean_ms": 0.0,
                    "min_ms": 0.0,
                    "max_ms": 0.0,
                    **{f"p{p}_ms": 0.0 for p in SERIES_PERCENTILES},
                }
            )
        rows.append(row)
    return rows


def _users(store: Store, run_id: str, window: int, by: str) -> dict[tuple[int, str], int]:
    """Max users (summed over a group's workers, and over groups for the run) per window."""
    per_second_group: dict[tuple[int, str], int] = defaultdict(int)
    for r in store.rows('SELECT t, "group", users FROM health WHERE run_id=:r', r=run_id):
        per_second_group[(int(r["t"]) - 1, r["group"])] += int(r["users"])
    out: dict[tuple[int, str], int] = {}
    if by == "run":
        per_second_run: dict[int, int] = defaultdict(int)
        for (t, _group), n in per_second_group.items():
            per_second_run[t] += n
        for t, n in per_second_run.items():
            key = (t - t % window, "")
            out[key] = max(out.get(key, 0), n)
    else:
        for (t, group), n in per_second_group.items():
            key = (t - t % window, group)
            out[key] = max(out.get(key, 0), n)
    return out
