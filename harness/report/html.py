"""The single-file HTML report of a run: opens offline, everything recomputed from the database.

The page is one file with no external reference: the chart library (uPlot, vendored in `assets/` with
its licence), the report's own CSS and JS, and the run's data (a JSON `<script>` block) are inlined.
Tables are rendered here with every value escaped; the JS draws the charts over time and marks the
run's lifecycle events on each time axis. A Content-Security-Policy allows only the inlined scripts
(by hash) and no network at all, so a name or an error message can never run code or fetch anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from harness.report.series import per_second
from harness.report.summary import CPU_WARNING, LAG_WARNING_MS, summarize
from harness.store import Run, Store

ASSETS = Path(__file__).with_name("assets")
MAX_POINTS = 1500
"""Longer runs merge seconds into wider windows so the embedded series stay small."""
MAX_ERRORS = 200
SECRET_KEY = re.compile(
    r"(?:^|[_\-])(?:token|api[_\-]?key|key|secret|passw(?:or)?d|passphrase|authorization|auth|cookie"
    r"|credentials?|private[_\-]?key|jwt[_\-]?secret)(?:$|[_\-])",
    re.I,
)
"""Keys whose values are secrets (`token`, `api_key`, `Authorization`, `wallet_key` …) but not counts
such as `max_tokens`: shown as `***`, whatever they hold."""
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:[a-z_]*(?:token|key|secret|password|auth)[a-z_]*))=[^&#\s]*", re.I
)
_PERCENTILES = ("p50", "p95", "p99")


def render_html(
    store: Store,
    run_id: str,
    summary: dict[str, Any] | None = None,
    timeline: dict[str, Any] | None = None,
) -> str:
    """The report of one run as a self-contained HTML document.

    Args:
        store: the database the run was recorded in.
        run_id: the run's id (or a unique prefix of it).
        summary: the run's summary; default: the one stored at the end of the run, else recomputed
            (without threshold verdicts) from the stored windows.
        timeline: optional timeline analysis (`window_s`, `rows`, `degradation`, `capacity`): adds a
            timeline table and marks the degradation point on every chart.
    """
    run = store.get_run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r} in {store.display}")
    if summary is None:
        summary = json.loads(run.summary_json) if run.summary_json else summarize(store, run)
    profile = redact(json.loads(run.profile_json or "{}"))
    errors = store.errors(run.id)
    data = _data(store, run, summary, timeline)
    title = f"{summary.get('profile') or run.profile} · {run.id} · harness report"
    body = "\n".join(
        [
            _header(run, summary, profile),
            _warnings(summary),
            _cards(summary),
            _charts(),
            _endpoints(summary),
            _groups(summary),
            _simulator_tables(summary),
            _thresholds(summary),
            _errors(errors, run.started_at),
            _timeline(timeline, run.started_at),
            _health(summary),
            _events(data["events"]),
            _profile(profile),
            _footer(),
        ]
    )
    css = (ASSETS / "uPlot.min.css").read_text(encoding="utf-8") + (ASSETS / "report.css").read_text(
        encoding="utf-8"
    )
    scripts = [
        _script_safe((ASSETS / "uPlot.iife.min.js").read_text(encoding="utf-8")),
        _script_safe((ASSETS / "report.js").read_text(encoding="utf-8")),
    ]
    hashes = " ".join(f"'sha256-{_sha256(s)}'" for s in scripts)
    csp = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data:; "
        "font-src data:; connect-src 'none'; form-action 'none'; base-uri 'none'"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'  # built from constants and hashes
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="harness">\n'
        f"<title>{_e(title)}</title>\n<style>\n{_style_safe(css)}\n</style>\n</head>\n<body>\n"
        f'<main class="page">\n{body}\n</main>\n'
        f'<script type="application/json" id="report-data">{_json_for_script(data)}</script>\n'
        + "".join(f"<script>{s}</script>\n" for s in scripts)
        + "</body>\n</html>\n"
    )


def write_html(
    store: Store,
    run_id: str,
    path: Path,
    summary: dict[str, Any] | None = None,
    timeline: dict[str, Any] | None = None,
) -> Path:
    """Write the run's HTML report to `path` (a directory gets `report.html` inside); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(store, run_id, summary, timeline), encoding="utf-8")
    return path


def redact(value: Any, key: str = "") -> Any:
    """A copy of a profile with every value under a secret-looking key replaced by `***`."""
    if key and SECRET_KEY.search(key):
        return "***" if value not in (None, "") else value
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        value = _URL_CREDENTIALS.sub(r"\g<scheme>***@", value)
        return _QUERY_SECRET.sub(r"\g<key>=***", value)
    return value


# -- data for the charts -----------------------------------------------------------------------


def _data(store: Store, run: Run, summary: dict[str, Any], timeline: dict[str, Any] | None) -> dict[str, Any]:
    started = run.started_at
    span = float(summary.get("duration_s") or ((run.ended_at or time.time()) - started))
    window = max(1, math.ceil(span / MAX_POINTS))
    by_run = per_second(store, run.id, window=window, by="run")
    by_group = per_second(store, run.id, window=window, by="group")
    by_name = per_second(store, run.id, window=window, by="name")
    failures: dict[tuple[int, str, str], int] = defaultdict(int)
    for r in store.rows(
        'SELECT t, "group", name, SUM(failures) AS failures FROM "window" WHERE run_id=:r '
        'GROUP BY t, "group", name',
        r=run.id,
    ):
        failures[(int(r["t"]) - int(r["t"]) % window, r["group"], r["name"])] += int(r["failures"] or 0)
    health: dict[int, dict[str, float]] = {}
    for r in store.rows("SELECT t, cpu_percent, loop_lag_max_ms FROM health WHERE run_id=:r", r=run.id):
        sec = int(r["t"]) - 1  # a health row reports the second before it
        h = health.setdefault(sec - sec % window, {"cpu": 0.0, "lag": 0.0})
        h["cpu"] = max(h["cpu"], float(r["cpu_percent"] or 0))
        h["lag"] = max(h["lag"], float(r["loop_lag_max_ms"] or 0))
    seconds = {r["t"] for r in by_run} | {k[0] for k in failures} | set(health)
    ts = list(range(min(seconds), max(seconds) + 1, window)) if seconds else []
    index = {t: i for i, t in enumerate(ts)}

    def column(rows: list[dict[str, Any]], field: str, fill: float | None) -> list[float | None]:
        out: list[float | None] = [fill] * len(ts)
        for row in rows:
            i = index.get(row["t"])
            if i is None:
                continue
            if field in ("p50_ms", "p95_ms", "p99_ms") and not row["requests"]:
                continue
            out[i] = round(float(row[field]), 3)
        return out

    fail_by_name: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * len(ts))
    fail_by_group: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(ts))
    fail_total = [0.0] * len(ts)
    for (t, g, n), count in failures.items():
        i = index[t]
        fail_by_name[(g, n)][i] += count / window
        fail_by_group[g][i] += count / window
        fail_total[i] += count / window

    def entry(rows: list[dict[str, Any]], fails: list[float]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "users": column(rows, "users", None),
            "rps": column(rows, "rps", 0.0),
            "errors": [round(v, 3) for v in fails],
        }
        for p in _PERCENTILES:
            out[p] = column(rows, f"{p}_ms", None)
        return out

    rows_by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in by_group:
        rows_by_group[row["group"]].append(row)
    rows_by_name: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in by_name:
        rows_by_name[(row["group"], row["name"])].append(row)
    group_names = list((summary.get("groups") or {}).keys())
    group_names += [g for g in rows_by_group if g not in group_names]
    groups = [{"group": g, **entry(rows_by_group[g], fail_by_group[g])} for g in group_names]
    endpoint_keys = [
        (e["group"], e["name"], e.get("kind", "request")) for e in summary.get("endpoints") or []
    ]
    known = {(g, n) for g, n, _ in endpoint_keys}
    endpoint_keys += [(g, n, "request") for g, n in sorted(rows_by_name) if (g, n) not in known]
    names = [
        {"group": g, "name": n, "kind": kind, **entry(rows_by_name[(g, n)], fail_by_name[(g, n)])}
        for g, n, kind in endpoint_keys
    ]
    events = [
        {"t": e["t"], "type": e["type"], "group": e.get("group"), "detail": e.get("detail") or {}}
        for e in summary.get("events") or []
    ]
    if not events:
        events = [
            {"t": round(e["t"] - started, 3), "type": e["type"], "group": e["group"], "detail": e["detail"]}
            for e in store.events(run.id)
        ]
    if timeline and timeline.get("degradation"):
        deg = timeline["degradation"]
        events.append(
            {
                "t": _relative(float(deg.get("t") or 0), started),
                "type": "degradation",
                "group": None,
                "detail": {k: v for k, v in deg.items() if k != "t"},
            }
        )
    return {
        "run_id": run.id,
        "window": window,
        "x": [round(t + window / 2 - started, 3) for t in ts],
        "total": entry(by_run, fail_total),
        "groups": groups,
        "names": names,
        "health": {
            "cpu": [round(health[t]["cpu"], 1) if t in health else None for t in ts],
            "lag": [round(health[t]["lag"], 2) if t in health else None for t in ts],
            "cpu_warning": CPU_WARNING,
            "lag_warning_ms": LAG_WARNING_MS,
        },
        "events": events,
    }


def _relative(t: float, started: float) -> float:
    """Seconds since the start, whether `t` is already relative or an epoch time."""
    return round(t - started, 3) if t > 1e9 else round(t, 3)


# -- page sections ------------------------------------------------------------------------------


def _header(run: Run, summary: dict[str, Any], profile: dict[str, Any]) -> str:
    status = str(summary.get("status") or run.status)
    description = profile.get("description") or run.description
    reason = summary.get("reason") or run.reason
    meta = [
        ("run", run.id),
        ("started", _clock(run.started_at)),
        ("duration", _duration(float(summary.get("duration_s") or 0))),
        ("host", run.host),
    ]
    if summary.get("exit_code") is not None:
        meta.append(("exit code", str(summary["exit_code"])))
    return (
        '<header class="top">'
        '<div class="title-row">'
        f'<h1><span class="muted">profile</span> {_e(summary.get("profile") or run.profile)}</h1>'
        f'<span class="badge status-{_e(status.lower())}">{_e(status.upper())}</span>'
        "</div>"
        + (f'<p class="description">{_e(description)}</p>' if description else "")
        + (f'<p class="reason {_e(status.lower())}">{_e(reason)}</p>' if reason else "")
        + '<dl class="meta">'
        + "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in meta if v)
        + "</dl></header>"
    )


def _warnings(summary: dict[str, Any]) -> str:
    warnings = (summary.get("health") or {}).get("warnings") or []
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return (
        '<div class="banner danger" role="alert"><strong>The load generator itself was saturated'
        " — the numbers below may be tainted by harness delay.</strong>"
        f"<ul>{items}</ul></div>"
    )


def _cards(summary: dict[str, Any]) -> str:
    totals = summary.get("totals") or {}
    thresholds = summary.get("thresholds") or []
    failed = sum(1 for t in thresholds if not t.get("ok"))
    cards = [
        ("requests", _int(totals.get("requests")), f"{_num(totals.get('rps'))} /s"),
        (
            "failures",
            _int(totals.get("failures")),
            f"{_pct(totals.get('error_rate'))} error rate",
            "bad" if totals.get("failures") else "",
        ),
        ("p50", _ms(totals.get("p50_ms")), "ms"),
        ("p95", _ms(totals.get("p95_ms")), "ms"),
        ("p99", _ms(totals.get("p99_ms")), "ms"),
        ("max", _ms(totals.get("max_ms")), "ms"),
        (
            "thresholds",
            f"{len(thresholds) - failed}/{len(thresholds)}",
            "passed" if not failed else f"{failed} failed",
            "bad" if failed else ("good" if thresholds else ""),
        ),
    ]
    if totals.get("dropped"):
        cards.append(("dropped", _int(totals.get("dropped")), "iterations", "bad"))
    out = []
    for card in cards:
        label, value, sub = card[0], card[1], card[2]
        tone = card[3] if len(card) > 3 else ""
        out.append(
            f'<div class="card {tone}"><div class="card-label">{_e(label)}</div>'
            f'<div class="card-value">{_e(value)}</div><div class="card-sub">{_e(sub)}</div></div>'
        )
    return f'<section class="cards">{"".join(out)}</section>'


def _charts() -> str:
    slots = [
        ("users", "Users", "active virtual users per group (open model: iterations in flight)"),
        ("rps", "Throughput", "requests per second"),
        ("latency", "Latency", "p50 / p95 / p99 in ms"),
        ("errors", "Errors", "failures per second"),
        ("health", "Harness health", "worst worker CPU and event-loop lag"),
    ]
    cards = "".join(
        f'<section class="chart-card" id="chart-{key}"><header><div><h3>{_e(title)}</h3>'
        f'<div class="chart-sub">{_e(sub)}</div></div><div class="controls"></div></header>'
        '<div class="chart"></div></section>'
        for key, title, sub in slots
    )
    return (
        '<section class="section"><div class="section-head"><h2>Over time</h2>'
        '<div class="legend-events" id="event-legend"></div></div>'
        f'<div class="charts">{cards}</div>'
        '<noscript><p class="muted">The charts need JavaScript; the tables below do not.</p></noscript>'
        "</section>"
    )


def _table(
    columns: list[tuple[str, str]],
    rows: list[list[tuple[str, Any]]],
    footer: list[str] | None = None,
    marked: set[int] | None = None,
) -> str:
    """A sortable table: columns are (label, "num"|"text"); cells are (shown HTML, sort value)."""
    head = "".join(
        f'<th class="{kind}" data-sort="{kind}" scope="col" tabindex="0">{_e(label)}</th>'
        for label, kind in columns
    )
    body = []
    for i, row in enumerate(rows):
        cells = []
        for (_label, kind), (shown, key) in zip(columns, row, strict=True):
            attr = f' data-v="{_e(key)}"' if kind == "num" and key is not None else ""
            cells.append(f'<td class="{kind}"{attr}>{shown}</td>')
        tr = '<tr class="marked">' if marked and i in marked else "<tr>"
        body.append(f"{tr}{''.join(cells)}</tr>")
    foot = ""
    if footer:
        foot = (
            "<tfoot><tr>"
            + "".join(
                f'<td class="{kind}">{cell}</td>' for (_, kind), cell in zip(columns, footer, strict=True)
            )
            + "</tr></tfoot>"
        )
    return (
        f'<div class="table-wrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody>{foot}</table></div>"
    )


def _section(title: str, content: str, note: str = "", anchor: str = "") -> str:
    ident = f' id="{_e(anchor)}"' if anchor else ""
    note_html = f'<span class="section-note">{note}</span>' if note else ""
    return (
        f'<section class="section"{ident}><div class="section-head"><h2>{_e(title)}</h2>{note_html}</div>'
        f"{content}</section>"
    )


_STAT_COLUMNS = [
    ("requests", "num"),
    ("failures", "num"),
    ("err %", "num"),
    ("rps", "num"),
    ("p50 ms", "num"),
    ("p90 ms", "num"),
    ("p95 ms", "num"),
    ("p99 ms", "num"),
    ("max ms", "num"),
]


def _stat_cells(s: dict[str, Any]) -> list[tuple[str, Any]]:
    failures = s.get("failures") or 0
    return [
        (_e(_int(s.get("requests"))), s.get("requests") or 0),
        (
            f'<span class="{"bad" if failures else "zero"}">{_e(_int(failures))}</span>',
            failures,
        ),
        (_e(_pct(s.get("error_rate"))), s.get("error_rate") or 0),
        (_e(_num(s.get("rps"))), s.get("rps") or 0),
        *[(_e(_ms(s.get(f"p{p}_ms"))), s.get(f"p{p}_ms") or 0) for p in (50, 90, 95, 99)],
        (_e(_ms(s.get("max_ms"))), s.get("max_ms") or 0),
    ]


def _endpoints(summary: dict[str, Any]) -> str:
    endpoints = summary.get("endpoints") or []
    if not endpoints:
        return _section("Endpoints", '<p class="empty">No requests were recorded.</p>', anchor="endpoints")
    has_intended = any(e.get("intended") for e in endpoints)
    columns = [("group", "text"), ("name", "text"), ("kind", "text"), *_STAT_COLUMNS]
    if has_intended:
        columns.append(("p99 intended", "num"))
    rows = []
    for e in endpoints:
        row = [
            (_e(e.get("group")), None),
            (f'<span class="name">{_e(e.get("name"))}</span>', None),
            (f'<span class="kind">{_e(e.get("kind") or "")}</span>', None),
            *_stat_cells(e),
        ]
        if has_intended:
            p99i = (e.get("intended") or {}).get("p99_ms")
            row.append((_e(_ms(p99i)) if p99i is not None else "", p99i or 0))
        rows.append(row)
    totals = summary.get("totals") or {}
    footer = ["<strong>total</strong>", "", "", *(cell for cell, _ in _stat_cells(totals))]
    if has_intended:
        footer.append("")
    note = "click a column to sort" + (
        "; <em>intended</em>: open-model latency measured from the scheduled start" if has_intended else ""
    )
    return _section("Endpoints", _table(columns, rows, footer), note, anchor="endpoints")


def _groups(summary: dict[str, Any]) -> str:
    totals = summary.get("group_totals") or {}
    groups = summary.get("groups") or {}
    names = list(groups) + [g for g in totals if g not in groups]
    if not names:
        return ""
    columns = [("group", "text"), ("simulator", "text"), ("model", "text"), ("max users", "num")]
    columns += [*_STAT_COLUMNS, ("dropped", "num")]
    rows = []
    for g in names:
        info, stats = groups.get(g) or {}, totals.get(g) or {}
        users = info.get("users_max")
        model = info.get("model") or ""
        users_text = (f"{_num(users)}/s" if model == "open" else _int(users)) if users is not None else ""
        dropped = stats.get("dropped") or 0
        rows.append(
            [
                (_e(g), None),
                (_e(info.get("simulator") or ""), None),
                (_e(model), None),
                (_e(users_text), users or 0),
                *_stat_cells(stats),
                (f'<span class="{"bad" if dropped else "zero"}">{_e(_int(dropped))}</span>', dropped),
            ]
        )
    return _section("Groups", _table(columns, rows), "open model: max arrival rate", anchor="groups")


def _simulator_tables(summary: dict[str, Any]) -> str:
    """Each simulator's end-of-run tables (`Simulator.summary_tables`), one section each."""
    out = []
    for i, extra in enumerate(summary.get("tables") or []):
        rows = [list(r) for r in extra.get("rows") or []]
        names = [str(c) for c in extra.get("columns") or []]
        columns = [
            (name, "num" if rows and all(isinstance(r[j], int | float) for r in rows) else "text")
            for j, name in enumerate(names)
        ]
        body = [
            [(_e(v if not isinstance(v, float) else f"{v:.4g}"), v) for v in row[: len(columns)]]
            for row in rows
        ]
        title = extra.get("title", "")
        if extra.get("group"):
            title = f"{extra['group']}: {title}"
        out.append(_section(str(title), _table(columns, body), _e(extra.get("note") or ""), f"table-{i}"))
    return "".join(out)


def _thresholds(summary: dict[str, Any]) -> str:
    thresholds = summary.get("thresholds") or []
    if not thresholds:
        return _section("Thresholds", '<p class="empty">No thresholds were set.</p>', anchor="thresholds")
    items = []
    for t in thresholds:
        ok = bool(t.get("ok"))
        value = t.get("value")
        shown = "no data" if value is None else _num(value, digits=3)
        abort = '<span class="tag">abort</span>' if t.get("abort") else ""
        verdict, mark = ("ok", "✓") if ok else ("fail", "✗")
        items.append(
            f'<li class="{verdict}"><span class="verdict" aria-label="{"passed" if ok else "failed"}">'
            f"{mark}</span><code>{_e(t.get('expr'))}</code>{abort}"
            f'<span class="value">{_e(shown)}</span></li>'
        )
    return _section("Thresholds", f'<ul class="thresholds">{"".join(items)}</ul>', anchor="thresholds")


def _errors(errors: list[dict[str, Any]], started: float) -> str:
    if not errors:
        return _section("Errors", '<p class="empty good">No errors.</p>', anchor="errors")
    columns = [
        ("count", "num"),
        ("group", "text"),
        ("name", "text"),
        ("message", "text"),
        ("first seen", "num"),
        ("last seen", "num"),
    ]
    rows = []
    for err in errors[:MAX_ERRORS]:
        first, last = err["first_seen"] - started, err["last_seen"] - started
        rows.append(
            [
                (f'<span class="bad">{_e(_int(err["count"]))}</span>', err["count"]),
                (_e(err["group"]), None),
                (f'<span class="name">{_e(err["name"])}</span>', None),
                (f'<span class="message">{_e(err["message"])}</span>', None),
                (_e(_offset(first)), round(first, 3)),
                (_e(_offset(last)), round(last, 3)),
            ]
        )
    total = sum(int(e["count"]) for e in errors)
    note = f"{_int(total)} in total, {len(errors)} distinct"
    if len(errors) > MAX_ERRORS:
        note += f" (the {MAX_ERRORS} most frequent shown)"
    return _section("Errors", _table(columns, rows), _e(note), anchor="errors")


def _timeline(timeline: dict[str, Any] | None, started: float) -> str:
    if not timeline:
        return ""
    deg = timeline.get("degradation") or None
    deg_t = _relative(float(deg["t"]), started) if deg and deg.get("t") is not None else None
    capacity = timeline.get("capacity") or None
    facts = []
    if capacity:
        facts.append(
            f'<div class="fact"><span>capacity</span><strong>{_e(_num(capacity.get("low")))} – '
            f"{_e(_num(capacity.get('high')))} users</strong></div>"
        )
    if deg:
        facts.append(
            f'<div class="fact bad"><span>degradation at {_e(_offset(deg_t or 0))}</span>'
            f"<strong>{_e(_num(deg.get('users')))} users</strong>"
            f"<em>{_e(deg.get('reason') or '')}</em></div>"
        )
    elif timeline.get("rows"):
        facts.append('<div class="fact good"><span>degradation</span><strong>none found</strong></div>')
    columns = [
        ("t", "num"),
        ("users", "num"),
        ("requests", "num"),
        ("failures", "num"),
        ("failure %", "num"),
        ("p50 ms", "num"),
        ("p95 ms", "num"),
        ("timeouts", "num"),
    ]
    rows = []
    marked = set()
    for r in timeline.get("rows") or []:
        t = _relative(float(r.get("t") or 0), started)
        rows.append(
            [
                (_e(_offset(t)), t),
                (_e(_num(r.get("users"))), r.get("users") or 0),
                (_e(_int(r.get("requests"))), r.get("requests") or 0),
                (_e(_int(r.get("failures"))), r.get("failures") or 0),
                (_e(_num(r.get("failure_pct"), digits=2)), r.get("failure_pct") or 0),
                (_e(_ms(r.get("p50_ms"))), r.get("p50_ms") or 0),
                (_e(_ms(r.get("p95_ms"))), r.get("p95_ms") or 0),
                (_e(_int(r.get("timeouts"))), r.get("timeouts") or 0),
            ]
        )
        if deg_t is not None and abs(t - deg_t) < 1e-6:
            marked.add(len(rows) - 1)
    table = _table(columns, rows, marked=marked)
    window = timeline.get("window_s")
    note = f"{_e(_num(window))} s windows" if window else ""
    return _section("Timeline", f'<div class="facts">{"".join(facts)}</div>{table}', note, anchor="timeline")


def _health(summary: dict[str, Any]) -> str:
    h = summary.get("health") or {}
    warn = bool(h.get("warnings"))
    cpu_max = float(h.get("cpu_max") or 0)
    lag_max = float(h.get("loop_lag_max_ms") or 0)
    facts = [
        ("CPU max", f"{cpu_max:.0f}%", cpu_max > CPU_WARNING),
        ("CPU mean", f"{float(h.get('cpu_mean') or 0):.0f}%", False),
        ("loop lag max", f"{_ms(lag_max)} ms", lag_max > LAG_WARNING_MS),
        ("loop lag mean", f"{_ms(h.get('loop_lag_mean_ms'))} ms", False),
        ("schedule lag max", f"{_ms(h.get('schedule_lag_max_ms'))} ms", False),
        ("dropped", _int(h.get("dropped")), bool(h.get("dropped"))),
        ("RSS max", _bytes(h.get("rss_max_bytes")), False),
    ]
    body = '<div class="facts">' + "".join(
        f'<div class="fact{" bad" if bad else ""}"><span>{_e(k)}</span><strong>{_e(v)}</strong></div>'
        for k, v, bad in facts
    )
    body += "</div>"
    if warn:
        body += '<ul class="warnings">' + "".join(f"<li>{_e(w)}</li>" for w in h["warnings"]) + "</ul>"
    else:
        body += (
            f'<p class="muted small">No sign that the load generator was the bottleneck (warns above '
            f"{CPU_WARNING:.0f}% CPU or {LAG_WARNING_MS:.0f} ms loop lag, or on any dropped iteration).</p>"
        )
    return _section("Harness health", body, anchor="health")


def _events(events: list[dict[str, Any]]) -> str:
    if not events:
        return ""
    rows = []
    for e in events:
        detail = ", ".join(
            f"{k}={json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}"
            for k, v in (e.get("detail") or {}).items()
        )
        rows.append(
            f'<tr><td class="num">{_e(_offset(float(e.get("t") or 0)))}</td>'
            f'<td><span class="evtype">{_e(e.get("type"))}</span></td>'
            f'<td>{_e(e.get("group") or "")}</td><td class="detail">{_e(detail)}</td></tr>'
        )
    table = (
        '<div class="table-wrap"><table class="events"><thead><tr><th class="num">t</th><th>event</th>'
        f"<th>group</th><th>detail</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )
    return _section(
        "Lifecycle events",
        f"<details><summary>{len(events)} events (marked on every chart's time axis)</summary>"
        f"{table}</details>",
        anchor="events",
    )


def _profile(profile: dict[str, Any]) -> str:
    if not profile:
        return ""
    text = yaml.safe_dump(profile, sort_keys=False, allow_unicode=True, width=100)
    return _section(
        "Profile",
        f'<details open><summary>the profile that ran</summary><pre class="yaml">{_e(text)}</pre></details>',
        "secrets are not stored; values of secret-looking keys are shown as ***",
        anchor="profile",
    )


def _footer() -> str:
    from harness import __version__

    return (
        f'<footer class="foot">harness {_e(__version__)} · report generated {_e(_clock(time.time()))} · '
        "charts by uPlot (MIT) · works offline</footer>"
    )


# -- formatting and escaping --------------------------------------------------------------------


def _e(value: Any) -> str:
    """Escape any value for HTML text and attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def _json_for_script(data: Any) -> str:
    """JSON that cannot end its `<script>` block or open a comment, whatever strings it holds."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _script_safe(code: str) -> str:
    return re.sub(r"</(script)", r"<\\/\1", code, flags=re.I)


def _style_safe(css: str) -> str:
    return re.sub(r"</(style)", r"<\\/\1", css, flags=re.I)


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _int(value: Any) -> str:
    return f"{int(value or 0):,}"


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    v = float(value)
    if v == int(v) and abs(v) >= 1:
        return f"{int(v):,}"
    return f"{v:,.{digits}f}"


def _ms(value: Any) -> str:
    """Three significant digits, as the console shows them."""
    if value is None:
        return "–"
    v = float(value)
    if v == 0:
        return "0"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _pct(value: Any) -> str:
    return f"{float(value or 0) * 100:.2f}%"


def _bytes(value: Any) -> str:
    v = float(value or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if v < 1024 or unit == "GB":
            return f"{v:.0f} {unit}" if unit in ("B", "KB") else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GB"


def _offset(seconds: float) -> str:
    sign = "-" if seconds < 0 else "+"
    s = abs(seconds)
    if s < 60:
        return f"{sign}{s:.1f}s"
    minutes, rest = divmod(s, 60)
    if minutes < 60:
        return f"{sign}{int(minutes)}m{rest:04.1f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{sign}{int(hours)}h{int(minutes):02d}m{int(rest):02d}s"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m or h else "") + f"{s:02d}s"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
