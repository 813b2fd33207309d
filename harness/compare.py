"""Baseline comparison: did this run get worse than the baseline?

The rules of the mlop seed's `compare_baseline.py`, per endpoint (group, name) and for the totals:

- p95 or p99 up by more than 20% *relative* to the baseline is a regression (each limit configurable);
- the error rate up by more than 5 *percentage points* (absolute) is a regression;
- requests/s is shown with its change but is never a regression (the profile sets the load).

Unlike the seed, a zero baseline does not divide by zero: a p95/p99 of 0 in the baseline (no
latency data) has no relative change, and the current value is a regression only if it exceeds an
absolute floor (`zero_floor_ms`, 1 ms by default); the result says so in its notes. Endpoints on only
one side are listed as added or removed, never as regressions. Iteration errors (kind `error`) are
not endpoints; their failures are in the totals' error rate.

A side is a summary dict (`summarize(...)` or a loaded `summary.json`); `load_side` resolves a run
id (or unique prefix) in the database or a path to a summary.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.errors import UsageError
from harness.store import Store

LATENCY_METRICS = ("p95_ms", "p99_ms")


@dataclass(frozen=True)
class Limits:
    """How much worse a run may get before it is a regression."""

    p95_pct: float = 20.0
    """p95 may rise by this many percent of the baseline."""
    p99_pct: float = 20.0
    """p99 may rise by this many percent of the baseline."""
    error_rate_pp: float = 5.0
    """The error rate may rise by this many percentage points."""
    zero_floor_ms: float = 1.0
    """With a zero baseline p95/p99, the current value is a regression only above this."""


# -- loading -------------------------------------------------------------------------------------
def load_summary_file(path: str | Path) -> dict[str, Any]:
    """A summary.json; UsageError if it is missing, not JSON or not a harness summary."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("totals"), dict):
        raise UsageError(f"{path}: not a harness summary.json (expected an object with 'totals')")
    if not isinstance(data.get("endpoints", []), list):
        raise UsageError(f"{path}: not a harness summary.json ('endpoints' must be a list)")
    return data


def looks_like_file(ref: str) -> bool:
    """True if `ref` names a file rather than a run id."""
    return ref.endswith(".json") or "/" in ref or "\\" in ref or Path(ref).is_file()


def load_side(ref: str, store: Store | None) -> dict[str, Any]:
    """`{"summary", "source": "run"|"file", "label", "run_id", "profile"}` for a run id (or unique
    prefix) in `store`, or a path to a summary.json."""
    if looks_like_file(ref):
        summary = load_summary_file(ref)
        return {
            "summary": summary,
            "source": "file",
            "label": ref,
            "run_id": summary.get("run_id"),
            "profile": summary.get("profile"),
        }
    if store is None:
        raise UsageError(f"{ref!r} is not a file, and there is no database to look up a run in")
    return {**run_summary(store, ref), "source": "run"}


def run_summary(store: Store, run_id: str) -> dict[str, Any]:
    """A run's summary recomputed from the database, with the threshold results it recorded."""
    from harness.report import summarize

    run = store.get_run(run_id)
    if run is None:
        raise UsageError(f"no run matches {run_id!r} (see `harness runs`)")
    stored = json.loads(run.summary_json) if run.summary_json else {}
    summary = summarize(store, run, stored.get("thresholds"))
    summary["reason"] = run.reason
    return {"summary": summary, "label": run.id, "run_id": run.id, "profile": run.profile}


def marked_baseline(store: Store, profile: str) -> str:
    """The run id marked as `profile`'s baseline; UsageError saying how to mark one."""
    run_id = store.get_baseline(profile)
    if run_id is None:
        raise UsageError(
            f"no baseline marked for profile {profile!r}: pass --baseline RUN_OR_SUMMARY_JSON, "
            "or mark one with `harness runs --mark-baseline RUN`"
        )
    return run_id


# -- comparing -----------------------------------------------------------------------------------
def _metrics(entry: dict[str, Any]) -> dict[str, float]:
    requests = int(entry.get("requests") or 0)
    failures = int(entry.get("failures") or 0)
    error_rate = entry.get("error_rate")
    if error_rate is None:
        error_rate = failures / requests if requests else 0.0
    return {
        "requests": requests,
        "failures": failures,
        "error_rate": float(error_rate),
        "rps": float(entry.get("rps") or 0.0),
        "p95_ms": float(entry.get("p95_ms") or 0.0),
        "p99_ms": float(entry.get("p99_ms") or 0.0),
    }


def _endpoints(summary: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (str(e.get("group", "")), str(e.get("name", ""))): e
        for e in summary.get("endpoints") or []
        if isinstance(e, dict) and e.get("kind") != "error"
    }


def _trend(delta: float) -> str:
    return "worse" if delta > 0 else "better" if delta < 0 else "same"


def compare_entry(
    label: str, baseline: dict[str, Any], current: dict[str, Any], limits: Limits
) -> dict[str, Any]:
    """One endpoint's (or the totals') comparison: values, deltas, status per metric, regressions."""
    base, cur = _metrics(baseline), _metrics(current)
    delta: dict[str, float | None] = {}
    status: dict[str, str] = {}
    regressions: list[str] = []
    notes: list[str] = []
    for metric, limit in (("p95_ms", limits.p95_pct), ("p99_ms", limits.p99_pct)):
        short = metric[:3]
        b, c = base[metric], cur[metric]
        delta[metric] = round(c - b, 3)
        status[metric] = _trend(c - b)
        if b > 0:
            pct = (c - b) / b * 100
            delta[f"{short}_pct"] = round(pct, 2)
            if pct > limit:
                status[metric] = "regression"
                regressions.append(
                    f"{label}: {short} {b:,.1f} → {c:,.1f} ms ({pct:+.1f}%, limit +{limit:g}%)"
                )
        else:
            delta[f"{short}_pct"] = None
            notes.append(
                f"{label}: the baseline {short} is 0 (no latency data), so there is no relative "
                f"change; it counts as a regression only if the current {short} exceeds "
                f"{limits.zero_floor_ms:g} ms"
            )
            if c > limits.zero_floor_ms:
                status[metric] = "regression"
                regressions.append(
                    f"{label}: {short} 0 → {c:,.1f} ms (zero baseline; floor {limits.zero_floor_ms:g} ms)"
                )
    pp = (cur["error_rate"] - base["error_rate"]) * 100
    delta["error_rate_pp"] = round(pp, 3)
    status["error_rate"] = _trend(pp)
    if pp > limits.error_rate_pp:
        status["error_rate"] = "regression"
        regressions.append(
            f"{label}: error rate {base['error_rate'] * 100:.2f}% → {cur['error_rate'] * 100:.2f}% "
            f"({pp:+.2f} pp, limit +{limits.error_rate_pp:g} pp)"
        )
    delta["rps"] = round(cur["rps"] - base["rps"], 3)
    delta["rps_pct"] = round((cur["rps"] - base["rps"]) / base["rps"] * 100, 2) if base["rps"] else None
    status["rps"] = "info"
    return {
        "baseline": base,
        "current": cur,
        "delta": delta,
        "status": status,
        "regression": bool(regressions),
        "regressions": regressions,
        "notes": notes,
    }


def compare_summaries(
    baseline: dict[str, Any], current: dict[str, Any], limits: Limits | None = None
) -> dict[str, Any]:
    """Compare two summaries: rows per endpoint present on both sides and one for the totals, the
    endpoints added or removed, every regression and note, and `regression` (the verdict)."""
    limits = limits or Limits()
    base_eps, cur_eps = _endpoints(baseline), _endpoints(current)
    rows = []
    for key in sorted(base_eps.keys() & cur_eps.keys()):
        group, name = key
        row = compare_entry(f"{group}/{name}", base_eps[key], cur_eps[key], limits)
        rows.append({"scope": "endpoint", "group": group, "name": name, **row})
    totals = compare_entry("total", baseline.get("totals") or {}, current.get("totals") or {}, limits)
    rows.append({"scope": "total", "group": None, "name": None, **totals})
    added = [{"group": g, "name": n} for g, n in sorted(cur_eps.keys() - base_eps.keys())]
    removed = [{"group": g, "name": n} for g, n in sorted(base_eps.keys() - cur_eps.keys())]
    notes = [note for row in rows for note in row["notes"]]
    if baseline.get("profile") and current.get("profile") and baseline["profile"] != current["profile"]:
        notes.insert(
            0, f"different profiles: baseline {baseline['profile']!r}, current {current['profile']!r}"
        )
    if baseline.get("run_id") and baseline.get("run_id") == current.get("run_id"):
        notes.insert(0, "the baseline is the current run itself")
    regressions = [r for row in rows for r in row["regressions"]]
    return {
        "limits": asdict(limits),
        "rows": rows,
        "added": added,
        "removed": removed,
        "regressions": regressions,
        "notes": notes,
        "regression": bool(regressions),
    }


def compare_runs(
    store: Store | None, current: str, baseline: str | None = None, limits: Limits | None = None
) -> dict[str, Any]:
    """Compare `current` (a run id or summary.json) with `baseline` (a run id or summary.json; None
    for the baseline marked for the current run's profile). The result of `compare_summaries` plus
    `baseline` and `current`: where each side came from."""
    cur = load_side(current, store)
    if baseline is None:
        profile = cur.get("profile")
        if store is None or not profile:
            raise UsageError("no --baseline given, and no database to find the profile's marked baseline in")
        baseline = marked_baseline(store, str(profile))
        base = {**run_summary(store, baseline), "source": "marked"}
    else:
        base = load_side(baseline, store)
    result = compare_summaries(base["summary"], cur["summary"], limits)
    for side, info in (("baseline", base), ("current", cur)):
        result[side] = {
            "source": info["source"],
            "label": info["label"],
            "run_id": info.get("run_id"),
            "profile": info.get("profile"),
            "status": info["summary"].get("status"),
        }
    return result


# -- printing ------------------------------------------------------------------------------------
_STYLE = {"regression": "bold red", "worse": "yellow", "better": "green", "same": "green", "info": ""}


def _table(result: dict[str, Any], wide: bool, rps: bool = True) -> Any:
    """The comparison table: "baseline → current" per metric when `wide`, else the current value;
    requests/s (information, never a regression) when `rps`."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(
        "endpoint",
        "p95 ms",
        "Δ p95",
        "p99 ms",
        "Δ p99",
        "err %",
        "Δ err",
        *(("rps", "Δ rps") if rps else ()),
        "result",
        box=box.SIMPLE_HEAVY,
        pad_edge=False,
    )
    for col in table.columns[1:]:
        col.justify = "right"
        col.no_wrap = True
    table.columns[0].overflow = "fold"
    labels = [f"{r['group']}/{r['name']}" for r in result["rows"] if r["scope"] == "endpoint"]
    table.columns[0].min_width = min(24, max([5, *map(len, labels)]))

    def pair(base_value: float, current_value: float, fmt: str) -> str:
        return f"{base_value:{fmt}} → {current_value:{fmt}}" if wide else f"{current_value:{fmt}}"

    def pct_cell(pct: float | None, absolute: float | None, unit: str, state: str) -> Text:
        if pct is None:
            text = f"{absolute:+,.1f} {unit} (n/a)" if absolute is not None else "n/a"
        else:
            text = f"{pct:+.1f}%"
        return Text(text, style=_STYLE.get(state, ""))

    for row in result["rows"]:
        b, c, d, s = row["baseline"], row["current"], row["delta"], row["status"]
        label = "total" if row["scope"] == "total" else f"{row['group']}/{row['name']}"
        table.add_row(
            Text(label, style="bold" if row["scope"] == "total" else ""),
            pair(b["p95_ms"], c["p95_ms"], ",.1f"),
            pct_cell(d["p95_pct"], d["p95_ms"], "ms", s["p95_ms"]),
            pair(b["p99_ms"], c["p99_ms"], ",.1f"),
            pct_cell(d["p99_pct"], d["p99_ms"], "ms", s["p99_ms"]),
            pair(b["error_rate"] * 100, c["error_rate"] * 100, ".2f"),
            Text(f"{d['error_rate_pp']:+.2f} pp", style=_STYLE.get(s["error_rate"], "")),
            *(
                (pair(b["rps"], c["rps"], ",.1f"), pct_cell(d["rps_pct"], d["rps"], "/s", "info"))
                if rps
                else ()
            ),
            Text("FAIL", style="bold red") if row["regression"] else Text("ok", style="green"),
        )
    return table


def print_comparison(result: dict[str, Any], console: Any = None) -> None:
    """A table of the comparison with coloured deltas, then added/removed endpoints, notes, verdict."""
    import rich

    console = console or rich.get_console()
    base, cur, limits = result["baseline"], result["current"], result["limits"]
    console.print(
        f"baseline [bold]{base['label']}[/] ({base['source']}, profile {base.get('profile') or '?'})  →  "
        f"current [bold]{cur['label']}[/] (profile {cur.get('profile') or '?'})",
        highlight=False,
    )
    # the widest table that fits: "baseline → current", else current values, else without rps
    for wide, rps in ((True, True), (False, True), (False, False)):
        table = _table(result, wide, rps)
        if table.__rich_measure__(console, console.options).maximum <= console.width:
            break
    console.print(table)
    for item in result["added"]:
        console.print(f"added (only in current): {item['group']}/{item['name']}", highlight=False)
    for item in result["removed"]:
        console.print(f"removed (only in baseline): {item['group']}/{item['name']}", highlight=False)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False, style="dim")
    console.print(
        f"limits: p95 +{limits['p95_pct']:g}%, p99 +{limits['p99_pct']:g}%, "
        f"error rate +{limits['error_rate_pp']:g} pp",
        style="dim",
        highlight=False,
    )
    if result["regression"]:
        console.print(f"[bold red]REGRESSION[/]: {len(result['regressions'])} check(s) failed")
        for line in result["regressions"]:
            console.print(f"  ✗ {line}", style="red", highlight=False)
    else:
        console.print("[bold green]NO REGRESSION[/] against the baseline")
