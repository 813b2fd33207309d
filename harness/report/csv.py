"""Locust-style CSV files of a run, recomputed from its stored windows (so they work for any past run).

    write_stats_csv(store, run_id, path)      per-endpoint statistics and an `Aggregated` row
    write_history_csv(store, run_id, path)    one row per second per (group, name), and aggregated
    write_failures_csv(store, run_id, path)   the deduplicated errors with their counts

The columns are Locust's (`--csv`), so existing spreadsheets and scripts keep working, plus a `Group`
column after `Name` (a name is unique only within its group). Times are milliseconds. Percentiles are
merges of the stored HdrHistograms — exact to the histogram's precision (0.1%), never an average of
per-second percentiles. As in Locust, a percentile of a row without requests is `N/A`.

`Requests/s` in the stats file is requests over the run's wall-clock duration (as in summary.json); in
the history file it is the requests of that second. The `Aggregated` row counts requests the way
summary.json's `totals` do: iteration errors (kind `error`, e.g. an exception in a simulator's code)
add failures but no requests.
"""

from __future__ import annotations

import csv
import operator
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from harness.errors import UsageError
from harness.metrics import counts_as_failure, counts_as_request, merge_into, new_histogram
from harness.store import Run, Store

CSV_PERCENTILES: tuple[float, ...] = (50, 66, 75, 80, 90, 95, 98, 99, 99.9, 99.99, 100)
PERCENTILE_COLUMNS = [f"{p:g}%" for p in CSV_PERCENTILES]

STATS_COLUMNS = [
    "Type",
    "Name",
    "Group",
    "Request Count",
    "Failure Count",
    "Median Response Time",
    "Average Response Time",
    "Min Response Time",
    "Max Response Time",
    "Average Content Size",
    "Requests/s",
    "Failures/s",
    *PERCENTILE_COLUMNS,
]
HISTORY_COLUMNS = [
    "Timestamp",
    "User Count",
    "Type",
    "Name",
    "Group",
    "Requests/s",
    "Failures/s",
    *PERCENTILE_COLUMNS,
    "Total Request Count",
    "Total Failure Count",
    "Total Median Response Time",
    "Total Average Response Time",
    "Total Min Response Time",
    "Total Max Response Time",
    "Total Average Content Size",
]
FAILURES_COLUMNS = ["Method", "Name", "Group", "Error", "Occurrences"]
AGGREGATED = "Aggregated"
NA = "N/A"


# -- histograms ----------------------------------------------------------------------------------
def histogram_stats(hist: HdrHistogram, points: Sequence[float] = CSV_PERCENTILES) -> dict[str, Any] | None:
    """Count, min, max, mean and percentiles (ms) of a microsecond histogram; None when it is empty.

    The same values as HdrHistogram's own `get_percentile_to_value_dict`, `get_mean_value`,
    `get_min_value` and `get_max_value`, computed over the counts array at C speed (a cumulative sum
    and a bisection) rather than one Python call per bucket — the history file needs two of these per
    name per second.
    """
    total = hist.get_total_count()
    if not total:
        return None
    top = min(
        hist.counts_len,
        hist.encoder.payload.counts_len,
        hist.get_counts_array_index(hist.max_value) + 1,
    )
    counts = hist.counts[:top]
    cumulative = list(accumulate(counts))
    highest, lowest, median = _index_values(hist)
    percentiles: dict[float, float] = {}
    for p in points:
        index = min(bisect_left(cumulative, hist.get_target_count_at_percentile(p)), top - 1)
        percentiles[p] = (highest[index] if p else lowest[index]) / 1000
    weighted = sum(map(operator.mul, counts, median[:top]))  # exact: integers, as get_mean_value sums
    return {
        "count": total,
        "min_ms": hist.get_min_value() / 1000,
        "max_ms": hist.get_max_value() / 1000,
        "mean_ms": weighted / total / 1000,
        "percentiles": percentiles,
    }


_INDEX_VALUES: dict[tuple[int, int, int, int], tuple[list[int], list[int], list[int]]] = {}


def _index_values(hist: HdrHistogram) -> tuple[list[int], list[int], list[int]]:
    """Per counts-array index: the highest, lowest and median equivalent value (computed once per
    histogram layout; every harness histogram has the same one)."""
    key = (
        hist.lowest_trackable_value,
        hist.highest_trackable_value,
        hist.significant_figures,
        hist.counts_len,
    )
    values = _INDEX_VALUES.get(key)
    if values is None:
        raw = [hist.get_value_from_index(i) for i in range(hist.counts_len)]
        values = (
            [hist.get_highest_equivalent_value(v) for v in raw],
            [hist.get_lowest_equivalent_value(v) for v in raw],
            [hist._hdr_median_equiv_value(v) for v in raw],
        )
        _INDEX_VALUES[key] = values
    return values


def _ms(value: float) -> float:
    return round(value, 3)


def _percentile_cells(stats: dict[str, Any] | None) -> dict[str, Any]:
    if stats is None:
        return dict.fromkeys(PERCENTILE_COLUMNS, NA)
    return {
        col: _ms(stats["percentiles"][p]) for col, p in zip(PERCENTILE_COLUMNS, CSV_PERCENTILES, strict=True)
    }


# -- shared inputs -------------------------------------------------------------------------------
def resolve_run(store: Store, run_id: str) -> Run:
    """The run with this id (or unique id prefix); UsageError naming it otherwise."""
    run = store.get_run(run_id)
    if run is None:
        raise UsageError(f"no run matches {run_id!r} (see `harness runs`)")
    return run


def run_seconds(store: Store, run: Run) -> float:
    """The run's wall-clock duration, as summary.json computes it."""
    ended = run.ended_at or store.last_activity(run.id) or time.time()
    return max(1e-9, ended - run.started_at)


def users_per_second(store: Store, run_id: str) -> dict[int, dict[str, int]]:
    """Users per second (epoch second → group → users summed over the group's workers).

    A worker's health row at time T describes the second that just ended, so it belongs to the
    window second T - 1 (the convention of `harness.report.series`).
    """
    out: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in store.rows('SELECT t, "group", users FROM health WHERE run_id=:r', r=run_id):
        out[int(r["t"]) - 1][r["group"]] += int(r["users"])
    return out


# -- stats ---------------------------------------------------------------------------------------
def stats_rows(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The rows of the stats file (one per (group, name), then `Aggregated`), keyed by column."""
    run = resolve_run(store, run_id)
    seconds = run_seconds(store, run)
    per: dict[tuple[str, str], dict[str, Any]] = {}
    total_hist = new_histogram()
    total = {"requests": 0, "failures": 0, "bytes": 0}
    for w in store.windows(run.id):
        entry = per.get((w["group"], w["name"]))
        if entry is None:
            entry = per[(w["group"], w["name"])] = {
                "kind": w["kind"],
                "requests": 0,
                "failures": 0,
                "bytes": 0,
                "hist": new_histogram(),
            }
        entry["requests"] += w["count"]
        entry["failures"] += w["failures"]
        entry["bytes"] += w["bytes_received"]
        merge_into(entry["hist"], w["hist"])
    rows = []
    for (group, name), entry in sorted(per.items()):
        rows.append(_stats_row(entry["kind"], name, group, entry, seconds))
        if counts_as_request(entry["kind"]):
            total["requests"] += entry["requests"]
            total["bytes"] += entry["bytes"]
            total_hist.add(entry["hist"])
        if counts_as_failure(entry["kind"]):
            total["failures"] += entry["failures"]
    rows.append(_stats_row("", AGGREGATED, "", {**total, "hist": total_hist}, seconds))
    return rows


def _stats_row(kind: str, name: str, group: str, entry: dict[str, Any], seconds: float) -> dict[str, Any]:
    stats = histogram_stats(entry["hist"])
    requests = entry["requests"]
    return {
        "Type": kind,
        "Name": name,
        "Group": group,
        "Request Count": requests,
        "Failure Count": entry["failures"],
        "Median Response Time": _ms(stats["percentiles"][50]) if stats else 0,
        "Average Response Time": _ms(stats["mean_ms"]) if stats else 0,
        "Min Response Time": _ms(stats["min_ms"]) if stats else 0,
        "Max Response Time": _ms(stats["max_ms"]) if stats else 0,
        "Average Content Size": round(entry["bytes"] / requests, 3) if requests else 0,
        "Requests/s": round(requests / seconds, 6),
        "Failures/s": round(entry["failures"] / seconds, 6),
        **_percentile_cells(stats),
    }


# -- history -------------------------------------------------------------------------------------
def history_rows(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The rows of the history file: for every second from the first stored window to the last, one
    row per (group, name) seen so far and one `Aggregated` row, keyed by column.

    `Requests/s`, `Failures/s` and the percentiles are that second's; the `Total …` columns are
    cumulative from the start of the run (as in Locust). `User Count` is the group's users in that
    second (all groups' for `Aggregated`).
    """
    run = resolve_run(store, run_id)
    seconds: dict[int, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
    kinds: dict[tuple[str, str], str] = {}
    for w in store.windows(run.id):
        key = (w["group"], w["name"])
        kinds.setdefault(key, w["kind"])
        cell = seconds[w["t"]].get(key)
        if cell is None:
            cell = seconds[w["t"]][key] = {"count": 0, "failures": 0, "bytes": 0, "hist": new_histogram()}
        cell["count"] += w["count"]
        cell["failures"] += w["failures"]
        cell["bytes"] += w["bytes_received"]
        merge_into(cell["hist"], w["hist"])
    if not seconds:
        return []
    users = users_per_second(store, run.id)
    running: dict[tuple[str, str], _Running] = {}
    aggregated = _Running()
    rows: list[dict[str, Any]] = []
    for t in range(min(seconds), max(seconds) + 1):
        cells = seconds.get(t, {})
        group_users = users.get(t, {})
        second_total = {"count": 0, "failures": 0, "bytes": 0, "hist": new_histogram()}
        for key in sorted(set(running) | set(cells)):
            cell = cells.get(key)
            state = running.setdefault(key, _Running())
            if cell is not None:
                state.add(cell)
                if counts_as_request(kinds[key]):
                    second_total["count"] += cell["count"]
                    second_total["bytes"] += cell["bytes"]
                    second_total["hist"].add(cell["hist"])
                if counts_as_failure(kinds[key]):
                    second_total["failures"] += cell["failures"]
            group, name = key
            rows.append(_history_row(t, group_users.get(group, 0), kinds[key], name, group, cell, state))
        aggregated.add(second_total)
        rows.append(_history_row(t, sum(group_users.values()), "", AGGREGATED, "", second_total, aggregated))
    return rows


class _Running:
    """Cumulative counts and histogram of one row key; stats recomputed only when it changed."""

    __slots__ = ("bytes", "count", "failures", "hist", "stats")

    def __init__(self) -> None:
        self.count = 0
        self.failures = 0
        self.bytes = 0
        self.hist = new_histogram()
        self.stats: dict[str, Any] | None = None

    def add(self, cell: dict[str, Any]) -> None:
        self.count += cell["count"]
        self.failures += cell["failures"]
        self.bytes += cell["bytes"]
        if cell["hist"].get_total_count():
            self.hist.add(cell["hist"])
            self.stats = histogram_stats(self.hist, (50,))


def _history_row(
    t: int, users: int, kind: str, name: str, group: str, cell: dict[str, Any] | None, state: _Running
) -> dict[str, Any]:
    current = histogram_stats(cell["hist"]) if cell is not None else None
    total = state.stats
    return {
        "Timestamp": t,
        "User Count": users,
        "Type": kind,
        "Name": name,
        "Group": group,
        "Requests/s": cell["count"] if cell else 0,
        "Failures/s": cell["failures"] if cell else 0,
        **_percentile_cells(current),
        "Total Request Count": state.count,
        "Total Failure Count": state.failures,
        "Total Median Response Time": _ms(total["percentiles"][50]) if total else 0,
        "Total Average Response Time": _ms(total["mean_ms"]) if total else 0,
        "Total Min Response Time": _ms(total["min_ms"]) if total else 0,
        "Total Max Response Time": _ms(total["max_ms"]) if total else 0,
        "Total Average Content Size": round(state.bytes / state.count, 3) if state.count else 0,
    }


# -- failures ------------------------------------------------------------------------------------
def failures_rows(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The rows of the failures file: each distinct error message, most frequent first."""
    run = resolve_run(store, run_id)
    kinds = {
        (r["group"], r["name"]): r["kind"]
        for r in store.rows('SELECT DISTINCT "group", name, kind FROM "window" WHERE run_id=:r', r=run.id)
    }
    return [
        {
            "Method": kinds.get((e["group"], e["name"]), ""),
            "Name": e["name"],
            "Group": e["group"],
            "Error": e["message"],
            "Occurrences": e["count"],
        }
        for e in store.errors(run.id)
    ]


# -- files ---------------------------------------------------------------------------------------
def _write(path: str | Path, columns: list[str], rows: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_stats_csv(store: Store, run_id: str, path: str | Path) -> Path:
    """Write the per-endpoint statistics (Locust's `_stats.csv` columns, plus `Group`)."""
    return _write(path, STATS_COLUMNS, stats_rows(store, run_id))


def write_history_csv(store: Store, run_id: str, path: str | Path) -> Path:
    """Write the per-second history (Locust's `_stats_history.csv` columns, plus `Group`)."""
    return _write(path, HISTORY_COLUMNS, history_rows(store, run_id))


def write_failures_csv(store: Store, run_id: str, path: str | Path) -> Path:
    """Write the distinct errors (Locust's `_failures.csv` columns, plus `Group`)."""
    return _write(path, FAILURES_COLUMNS, failures_rows(store, run_id))


def write_csv_reports(store: Store, run_id: str, out: str | Path) -> list[Path]:
    """All three files: into `out` if it is a folder (`stats.csv`, `stats_history.csv`,
    `failures.csv`), or — if `out` names a `.csv` file — the stats there and the others next to it
    (`NAME_history.csv`, `NAME_failures.csv`)."""
    out = Path(out)
    if out.suffix.lower() == ".csv":
        stats = out
        history = out.with_name(f"{out.stem}_history.csv")
        failures = out.with_name(f"{out.stem}_failures.csv")
    else:
        stats, history, failures = out / "stats.csv", out / "stats_history.csv", out / "failures.csv"
    return [
        write_stats_csv(store, run_id, stats),
        write_history_csv(store, run_id, history),
        write_failures_csv(store, run_id, failures),
    ]
