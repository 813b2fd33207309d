"""Reports recomputed from the database: the run summary (`summary.json`) and its endpoint table.

Everything here reads stored windows, never process memory, so a report can be rebuilt for any run
at any time — including one whose controller was killed.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness.metrics import counts_as_failure, counts_as_request, merge_into, new_histogram
from harness.simulator import load_simulator
from harness.store import Run, Store

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 95, 99)
CPU_WARNING = 80.0
"""A worker above this CPU share may have delayed requests: the numbers are flagged."""
LAG_WARNING_MS = 50.0
"""Event-loop lag above this delays requests and timers: the numbers are flagged."""


def _stats(
    hist: Any, requests: int, failures: int, seconds: float, hist_intended: Any = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": requests,
        "failures": failures,
        "error_rate": round(failures / requests, 6) if requests else 0.0,
        "rps": round(requests / seconds, 3) if seconds > 0 else 0.0,
    }
    if hist is not None and hist.get_total_count():
        values = hist.get_percentile_to_value_dict(list(PERCENTILES))
        out["mean_ms"] = round(hist.get_mean_value() / 1000, 3)
        for p in PERCENTILES:
            out[f"p{p}_ms"] = round(values[p] / 1000, 3)
        out["max_ms"] = round(hist.get_max_value() / 1000, 3)
    else:
        out.update({"mean_ms": 0.0, **{f"p{p}_ms": 0.0 for p in PERCENTILES}, "max_ms": 0.0})
    if hist_intended is not None and hist_intended.get_total_count():
        values = hist_intended.get_percentile_to_value_dict(list(PERCENTILES))
        out["intended"] = {f"p{p}_ms": round(values[p] / 1000, 3) for p in PERCENTILES}
        out["intended"]["max_ms"] = round(hist_intended.get_max_value() / 1000, 3)
    return out


def summarize(store: Store, run: Run, thresholds: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run's summary, merged from every stored window (exact to the histogram's precision)."""
    windows = store.windows(run.id)
    ended = run.ended_at or store.last_activity(run.id) or time.time()
    seconds = max(1e-9, ended - run.started_at)
    per: dict[tuple[str, str], dict[str, Any]] = {}
    group_hists: dict[str, Any] = {}
    group_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    total_hist = new_histogram()
    total = [0, 0]
    for w in windows:
        key = (w["group"], w["name"])
        entry = per.get(key)
        if entry is None:
            entry = per[key] = {
                "kind": w["kind"],
                "requests": 0,
                "failures": 0,
                "hist": new_histogram(),
                "hist_intended": None,
                "bytes_received": 0,
                "bytes_sent": 0,
            }
        entry["requests"] += w["count"]
        entry["failures"] += w["failures"]
        entry["bytes_received"] += w["bytes_received"]
        entry["bytes_sent"] += w["bytes_sent"]
        merge_into(entry["hist"], w["hist"])
        if w["hist_intended"]:
            if entry["hist_intended"] is None:
                entry["hist_intended"] = new_histogram()
            merge_into(entry["hist_intended"], w["hist_intended"])
    endpoints = []
    for (group, name), entry in sorted(per.items()):
        counts_in_totals = counts_as_request(entry["kind"])
        stats = _stats(entry["hist"], entry["requests"], entry["failures"], seconds, entry["hist_intended"])
        endpoints.append(
            {
                "group": group,
                "name": name,
                "kind": entry["kind"],
                **stats,
                "bytes_received": entry["bytes_received"],
                "bytes_sent": entry["bytes_sent"],
            }
        )
        gc = group_counts[group]
        gc[0] += entry["requests"] if counts_in_totals else 0
        gc[1] += entry["failures"] if counts_as_failure(entry["kind"]) else 0
        if counts_in_totals:
            group_hists.setdefault(group, new_histogram()).add(entry["hist"])
            total_hist.add(entry["hist"])
            total[0] += entry["requests"]
        total[1] += entry["failures"] if counts_as_failure(entry["kind"]) else 0
    profile = json.loads(run.profile_json or "{}")
    health = store.health_summary(run.id)
    dropped_by_group = {
        r["group"]: int(r["dropped"] or 0)
        for r in store.rows(
            'SELECT "group", SUM(dropped) AS dropped FROM health WHERE run_id=:r GROUP BY "group"', r=run.id
        )
    }
    group_totals = {}
    for group, (requests, failures) in group_counts.items():
        group_totals[group] = _stats(group_hists.get(group), requests, failures, seconds)
        group_totals[group]["dropped"] = dropped_by_group.get(group, 0)
    totals = _stats(total_hist, total[0], total[1], seconds)
    totals["dropped"] = int(health.get("dropped") or 0)
    warnings = []
    if health.get("cpu_max", 0) > CPU_WARNING:
        warnings.append(
            f"a worker reached {health['cpu_max']:.0f}% CPU: the load generator may have been the bottleneck"
        )
    if health.get("loop_lag_max_ms", 0) > LAG_WARNING_MS:
        warnings.append(
            f"event-loop lag reached {health['loop_lag_max_ms']:.0f} ms: latencies include harness delay"
        )
    if totals["dropped"]:
        warnings.append(
            f"{totals['dropped']} iterations were dropped (open model could not keep the arrival rate)"
        )
    health["warnings"] = warnings
    counters = counter_totals(store, run.id)
    tables = simulator_tables(profile, endpoints, counters)
    all_events = store.events(run.id)
    users_max: dict[str, float] = {}
    for event in all_events:
        if event["type"] in ("scaled", "scaled_manually") and event["group"]:
            value = event["detail"].get("users", event["detail"].get("rate", event["detail"].get("value")))
            if value is not None:
                users_max[event["group"]] = max(users_max.get(event["group"], 0), value)
        elif event["type"] == "run_stopped":
            for group, value in (event["detail"].get("users_max") or {}).items():
                users_max[group] = max(users_max.get(group, 0), value)
    groups = {
        name: {
            "simulator": cfg.get("simulator"),
            "users_max": users_max.get(name, 0),
            "model": "open" if cfg.get("arrival_rate") is not None else cfg.get("model") or "closed",
        }
        for name, cfg in (profile.get("groups") or {}).items()
    }
    events = [
        {
            "t": round(e["t"] - run.started_at, 3),
            "type": e["type"],
            "group": e["group"],
            "detail": e["detail"],
        }
        for e in all_events
    ]
    return {
        "run_id": run.id,
        "profile": run.profile,
        "status": run.status,
        "started_at": _iso(run.started_at),
        "ended_at": _iso(ended),
        "duration_s": round(seconds, 3),
        "totals": totals,
        "group_totals": group_totals,
        "endpoints": endpoints,
        "thresholds": thresholds or [],
        "groups": groups,
        "counters": counters,
        "tables": tables,
        "events": events,
        "errors": [
            {k: r[k] for k in ("group", "name", "message", "count")} for r in store.errors(run.id)[:50]
        ],
        "health": health,
    }


def counter_totals(store: Store, run_id: str) -> dict[str, dict[str, float]]:
    """Every counter's total over the run, by group and name."""
    totals: dict[str, dict[str, float]] = defaultdict(dict)
    for row in store.rows(
        "SELECT \"group\", name, SUM(value) AS total FROM metric WHERE run_id=:r AND type='counter' "
        'GROUP BY "group", name ORDER BY "group", name',
        r=run_id,
    ):
        value = float(row["total"] or 0.0)
        totals[row["group"]][row["name"]] = int(value) if value.is_integer() else round(value, 6)
    return dict(totals)


def simulator_tables(
    profile: dict[str, Any], endpoints: list[dict[str, Any]], counters: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """The end-of-run tables each group's simulator adds (`Simulator.summary_tables`), tagged by group.

    A simulator that cannot be loaded here (its extra is not installed where the report is rebuilt) or
    whose hook fails adds nothing: a report must never fail because of a plugin.
    """
    tables: list[dict[str, Any]] = []
    for group, cfg in (profile.get("groups") or {}).items():
        try:
            cls = load_simulator(str(cfg.get("simulator") or ""))
            made = cls.summary_tables(
                group, [e for e in endpoints if e["group"] == group], dict(counters.get(group, {}))
            )
        except Exception as exc:  # a plugin's failure is logged and isolated
            log.warning("group %r: no end-of-run tables: %s", group, exc)
            continue
        tables.extend({"group": group, **table} for table in made)
    return tables


def write_summary(summary: dict[str, Any], report_dir: Path) -> Path:
    """Write `summary.json` into the report directory."""
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"
