"""The `api` blueprint: the panel's JSON API (the page uses it; so can any script).

Errors are JSON `{error, field?}` with 400 (bad input), 401 (no token), 403 (CSRF or Origin),
404 (no such run or profile), 409 (a run is active / the run is not active) or 413 (profile too big).
Every action is recorded with who asked: `panel <remote address>`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from flask import Blueprint, Response, current_app, jsonify, request, send_file, session
from sqlalchemy import text

from harness.compare import Limits, compare_runs, looks_like_file
from harness.durations import parse_duration
from harness.errors import ProfileError, UsageError
from harness.profile import LoadedProfile, builtin_profiles, load_profile_text
from harness.report import per_second, summarize
from harness.report.html import redact
from harness.store import Run, Store
from web.cluster import OwnerUnavailable
from web.extensions import get_runs, get_store
from web.runs import RunConflict, RunNotFound, RunRecord
from web.security import (
    STATE_CHANGING,
    bearer_token,
    configured_token,
    csrf_ok,
    csrf_token,
    served_on_loopback,
    session_authenticated,
    token_fingerprint,
    token_matches,
)

bp = Blueprint("api", __name__, url_prefix="/api")

PUBLIC_ENDPOINTS = {"api.get_session", "api.login"}
"""Endpoints that answer without authentication (the page needs them to log in)."""
REPORT_FILES = {"html": "report.html", "json": "summary.json", "junit": "junit.xml", "csv": "stats.csv"}
REPORT_TYPES = {
    "html": "text/html",
    "json": "application/json",
    "junit": "application/xml",
    "csv": "text/csv",
}
MAX_OVERRIDES = 100
MAX_WINDOW = 3600
CLOCK_WARNING_S = 0.5
"""An agent whose clock is off by more than this distorts the timeline: the panel warns."""


class ApiError(Exception):
    """An error answered as JSON `{error, field?}` with an HTTP status."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def _error(status: int, message: str, field: str | None = None) -> tuple[Response, int]:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return jsonify(body), status


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError) -> tuple[Response, int]:
    return _error(exc.status, exc.message, exc.field)


@bp.errorhandler(ProfileError)
def _profile_error(exc: ProfileError) -> tuple[Response, int]:
    return _error(400, str(exc), exc.field)


@bp.errorhandler(RunNotFound)
def _not_found(exc: RunNotFound) -> tuple[Response, int]:
    return _error(404, str(exc))


@bp.errorhandler(RunConflict)
def _conflict(exc: RunConflict) -> tuple[Response, int]:
    return _error(409, str(exc))


@bp.errorhandler(OwnerUnavailable)
def _owner_unavailable(exc: OwnerUnavailable) -> tuple[Response, int]:
    return _error(503, str(exc))


@bp.errorhandler(UsageError)
def _usage_error(exc: UsageError) -> tuple[Response, int]:
    return _error(400, str(exc))


# -- access control --------------------------------------------------------------------------------
@bp.before_request
def _guard() -> tuple[Response, int] | None:
    """401 without the token (when one is set); 403 for a cross-site or token-less state change."""
    token = configured_token()
    if token is None and not served_on_loopback(request.environ):
        return _error(403, "the panel is served on a non-loopback address without a token: set HARNESS_TOKEN")
    given = bearer_token(request)
    bearer_ok = token_matches(given, token)
    if token is not None and given is not None and not bearer_ok:
        return _error(401, "wrong token")
    if (
        token is not None
        and not bearer_ok
        and request.endpoint not in PUBLIC_ENDPOINTS
        and not session_authenticated(token)
    ):
        return _error(401, "authentication required: POST /api/login {token} or send Authorization: Bearer")
    if request.method in STATE_CHANGING and not bearer_ok and not csrf_ok(request):
        return _error(
            403, "cross-site request refused: send X-CSRF-Token from GET /api/session, from the same origin"
        )
    return None


def _who() -> str:
    """Who is asking, as recorded with every action."""
    return f"panel {request.remote_addr or 'unknown'}"


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ApiError(400, "expected a JSON object body (Content-Type: application/json)")
    return data


@bp.get("/session")
def get_session() -> Response:
    """Whether a token is required, whether this browser has logged in, and its CSRF token."""
    token = configured_token()
    return jsonify(
        auth_required=token is not None,
        authenticated=session_authenticated(token),
        csrf_token=csrf_token(),
    )


@bp.post("/login")
def login() -> Response | tuple[Response, int]:
    """Log in with the token: the session cookie (HttpOnly, SameSite=Strict) keeps it."""
    token = configured_token()
    if token is None:
        return jsonify(authenticated=True, auth_required=False, csrf_token=csrf_token())
    given = _body().get("token")
    if not token_matches(given, token):
        time.sleep(0.2)  # a guessing script gets five tries a second per thread, not thousands
        return _error(401, "wrong token", "token")
    session["auth"] = token_fingerprint(token)
    return jsonify(authenticated=True, auth_required=True, csrf_token=csrf_token())


@bp.post("/logout")
def logout() -> Response:
    """Forget this browser's login."""
    session.pop("auth", None)
    return jsonify(authenticated=configured_token() is None)


# -- profiles --------------------------------------------------------------------------------------
@bp.get("/profiles")
def list_profiles() -> Response:
    """The built-in profiles: name and description."""
    out = []
    for name, path in sorted(builtin_profiles().items()):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            data = {}
        description = str(data.get("description", "")).strip() if isinstance(data, dict) else ""
        out.append({"name": name, "description": description})
    return jsonify(profiles=out)


@bp.get("/profiles/<name>")
def get_profile(name: str) -> Response:
    """A built-in profile's YAML, as written (`${VAR}` placeholders stay; secret-looking keys are ***)."""
    path = builtin_profiles().get(name)
    if path is None:
        raise ApiError(404, f"no built-in profile named {name!r}")
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    safe = redact(data)
    if safe != data:
        text = yaml.safe_dump(safe, sort_keys=False, allow_unicode=True)
    return jsonify(name=name, yaml=text)


def _overrides(body: dict[str, Any]) -> list[str]:
    overrides = body.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ApiError(400, 'overrides: expected a list of "dotted.key=value" strings', "overrides")
    if len(overrides) > MAX_OVERRIDES:
        raise ApiError(400, f"overrides: at most {MAX_OVERRIDES}", "overrides")
    return list(overrides)


def _profile_text(body: dict[str, Any], key: str = "yaml") -> str:
    text = body.get(key)
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, f"{key}: expected the profile's YAML text", key)
    limit = int(current_app.config["MAX_PROFILE_BYTES"])
    if len(text.encode("utf-8")) > limit:
        raise ApiError(413, f"{key}: the profile is larger than {limit} bytes", key)
    return text


def _load(body: dict[str, Any], overrides: list[str]) -> LoadedProfile:
    """The profile a request names (`profile`: a built-in name) or carries (`yaml`), validated."""
    has_name, has_yaml = body.get("profile") is not None, body.get("yaml") is not None
    if has_name == has_yaml:
        raise ApiError(400, "give either profile (a built-in name) or yaml (the profile's text)", "profile")
    if has_name:
        name = body["profile"]
        path = builtin_profiles().get(name) if isinstance(name, str) else None
        if path is None:
            # only built-in names: a path would let a client read files on the server
            raise ApiError(400, f"profile: no built-in profile named {name!r}", "profile")
        return load_profile_text(path.read_text(encoding="utf-8"), str(path), overrides, base_dir=path.parent)
    return load_profile_text(_profile_text(body), "panel", overrides)


def _describe(loaded: LoadedProfile) -> dict[str, Any]:
    profile = loaded.profile
    return {
        "ok": True,
        "name": profile.name,
        "description": profile.description,
        "duration_s": profile.duration,
        "groups": [
            {
                "name": name,
                "simulator": g.simulator,
                "mode": g.mode,
                "users": g.users,
                "arrival_rate": g.arrival_rate,
                "target": g.base,
                "processes": g.processes,
            }
            for name, g in profile.groups.items()
        ],
        "thresholds": [t.expr for t in profile.thresholds],
    }


@bp.post("/profiles/validate")
def validate_profile() -> Response:
    """Validate a profile's YAML: `{ok, name, groups}` or 400 `{error, field}`."""
    body = _body()
    loaded = load_profile_text(_profile_text(body), "panel", _overrides(body))
    return jsonify(_describe(loaded))


# -- runs ------------------------------------------------------------------------------------------
@bp.post("/runs")
def start_run() -> tuple[Response, int]:
    """Start a run: `{profile | yaml, overrides?, duration?}` → 201 `{run_id}`."""
    body = _body()
    overrides = _overrides(body)
    duration = body.get("duration")
    if duration is not None:
        try:
            if isinstance(duration, bool) or not isinstance(duration, str | int | float):
                raise ValueError(f"expected a duration such as 30s, got {duration!r}")
            parse_duration(duration if isinstance(duration, str) else str(duration))
        except ValueError as exc:
            raise ApiError(400, f"duration: {exc}", "duration") from None
        overrides.append(f"duration={duration}")
    loaded = _load(body, overrides)
    run_id = get_runs().start(loaded, _who())
    return jsonify(run_id=run_id), 201


def _run_row(run: Run, live_status: str | None, baselines: dict[str, str]) -> dict[str, Any]:
    """A stored run; `active` and `status` from whichever panel process runs it (`live_status`, None
    when none does)."""
    summary: dict[str, Any] = json.loads(run.summary_json) if run.summary_json else {}
    totals = summary.get("totals") or {}
    active = live_status is not None
    ended = run.ended_at
    return {
        "id": run.id,
        "profile": run.profile,
        "description": run.description,
        "status": live_status or run.status,
        "started_at": run.started_at,
        "ended_at": ended,
        "duration_s": round((ended or time.time()) - run.started_at, 3),
        "planned_duration_s": run.duration_s,
        "requests": totals.get("requests"),
        "failures": totals.get("failures"),
        "error_rate": totals.get("error_rate"),
        "rps": totals.get("rps"),
        "p95_ms": totals.get("p95_ms"),
        "exit_code": run.exit_code,
        "reason": run.reason,
        "baseline": baselines.get(run.profile) == run.id,
        "active": active,
    }


def _memory_row(record: RunRecord) -> dict[str, Any]:
    """A run this panel started that has no database row (yet, or ever: it failed at start)."""
    c = record.controller
    return {
        "id": c.run_id,
        "profile": c.loaded.profile.name,
        "description": c.loaded.profile.description,
        "status": c.status,
        "started_at": c.started_at or record.created_at,
        "ended_at": None,
        "duration_s": 0.0,
        "planned_duration_s": c.loaded.profile.duration,
        "requests": None,
        "failures": None,
        "error_rate": None,
        "rps": None,
        "p95_ms": None,
        "exit_code": record.exit_code,
        "reason": c.error or "",
        "error": c.error,
        "baseline": False,
        "active": record.active,
    }


@bp.get("/runs")
def list_runs() -> Response:
    """Every recorded run, newest first (`?limit=`, default 200)."""
    limit = _int_arg("limit", 200, 1, 10000)
    store, manager = get_store(), get_runs()
    rows = store.list_runs(limit)
    statuses, remote = manager.active_statuses()
    # a run no process here answers for: its controller may have died (another panel process, a
    # headless `harness start`); the store knows when that can be concluded
    stale = any(r.status == "running" and r.id not in statuses for r in rows)
    if stale and manager.recover_stale(store):
        rows = store.list_runs(limit)
    baselines = store.baselines()
    out = [_run_row(r, statuses.get(r.id), baselines) for r in rows]
    known = {r.id for r in rows}
    extra = [_memory_row(rec) for rec in manager.records() if rec.run_id not in known]
    extra += [_remote_row(k, v) for k, v in remote.items() if k not in known]
    if extra and len(rows) == limit:
        oldest = rows[-1].started_at
        extra = [e for e in extra if e["started_at"] >= oldest]
    out = sorted(out + extra, key=lambda r: r["started_at"], reverse=True)
    return jsonify(runs=out)


def _remote_row(run_id: str, state: dict[str, Any]) -> dict[str, Any]:
    """Another panel process's active run that has no database row yet."""
    return {
        "id": run_id,
        "profile": state.get("profile"),
        "description": state.get("description", ""),
        "status": state.get("status"),
        "started_at": state.get("started_at") or 0.0,
        "ended_at": None,
        "duration_s": 0.0,
        "planned_duration_s": state.get("planned_duration_s"),
        "requests": None,
        "failures": None,
        "error_rate": None,
        "rps": None,
        "p95_ms": None,
        "exit_code": None,
        "reason": "",
        "baseline": False,
        "active": True,
    }


def _find_run(run_id: str) -> tuple[Run | None, RunRecord | None]:
    """The stored run and this panel's record of it; 404 when neither exists (nor is another
    panel process running it)."""
    manager = get_runs()
    record = manager.get(run_id)
    run = get_store().get_run(run_id)
    if run is not None and record is None:
        record = manager.get(run.id)
    if run is None and record is None and manager.remote(run_id) is None:
        raise ApiError(404, f"no run {run_id!r}")
    return run, record


def _stored_run(run_id: str) -> Run:
    run, _record = _find_run(run_id)
    if run is None:
        raise ApiError(404, f"run {run_id} has no recorded data (it did not start)")
    return run


def _redact_strings(value: Any) -> Any:
    """Credentials in URLs and secret query parameters replaced with *** in every string."""
    if isinstance(value, dict):
        return {k: _redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_strings(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def _summary(store: Store, run: Run) -> dict[str, Any] | None:
    if run.summary_json:
        stored: dict[str, Any] = json.loads(run.summary_json)
        return stored
    if run.status == "running":
        return None
    return summarize(store, run)  # a run whose controller died: recomputed from its windows


@bp.get("/runs/<run_id>")
def get_run(run_id: str) -> Response:
    """`{run, summary, live, groups, profile}`: live and groups only while the run is active."""
    run, record = _find_run(run_id)
    manager = get_runs()
    if run is None:
        if record is not None:
            row, raw = _memory_row(record), record.controller.loaded.raw
        else:  # another panel process's run, not stored yet
            state = manager.remote(run_id) or {}
            row, raw = _remote_row(run_id, state), state.get("raw") or {}
        return jsonify(
            run=row,
            summary=None,
            live=manager.live(row["id"]),
            groups=manager.groups(row["id"]),
            profile=redact(raw),
        )
    store = get_store()
    row = _run_row(run, manager.status_of(run.id), store.baselines())
    summary = None if row["active"] else _summary(store, run)
    return jsonify(
        run=row,
        summary=_redact_strings(summary) if summary is not None else None,
        live=manager.live(run.id),
        groups=manager.groups(run.id),
        profile=redact(json.loads(run.profile_json or "{}")),
    )


@bp.post("/runs/<run_id>/stop")
def stop_run(run_id: str) -> tuple[Response, int]:
    """Stop an active run gracefully (again: at once) → 202."""
    run, record = _find_run(run_id)
    rid = record.run_id if record is not None else run.id if run is not None else run_id
    manager = get_runs()
    if manager.status_of(rid) is None:
        raise ApiError(409, f"run {rid} is not active")
    manager.stop(rid, _who())
    return jsonify(run_id=rid, status="stopping"), 202


def _scale_value(body: dict[str, Any]) -> tuple[str, float | None]:
    keys = [k for k in ("users", "rate") if k in body]
    if len(keys) != 1:
        raise ApiError(400, "give either users (closed model) or rate (open model)", "users")
    key = keys[0]
    value = body[key]
    if value is None:
        return key, None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ApiError(400, f"{key}: expected a number >= 0, or null to follow the shape again", key)
    if key == "users" and not float(value).is_integer():
        raise ApiError(400, "users: expected a whole number", key)
    return key, float(value)


@bp.post("/runs/<run_id>/groups/<group>")
def scale_group(run_id: str, group: str) -> tuple[Response, int]:
    """Hold a group at `{users: n}` or `{rate: n}` (null: follow its shape again) → 202."""
    run, record = _find_run(run_id)
    rid = record.run_id if record is not None else run.id if run is not None else run_id
    manager = get_runs()
    modes = manager.group_modes(rid)
    if modes is None:
        raise ApiError(409, f"run {rid} is not active")
    key, value = _scale_value(_body())
    if group not in modes:
        raise ApiError(400, f"no group {group!r} in this run (groups: {', '.join(modes)})", "group")
    expected = "users" if modes[group] == "closed" else "rate"
    if key != expected:
        raise ApiError(400, f"group {group!r} uses the {modes[group]} model: set {expected}, not {key}", key)
    manager.scale(rid, group, value, _who())
    return jsonify(run_id=rid, group=group, **{key: value}), 202


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    text = request.args.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{name}: expected a whole number, got {text!r}", name) from None
    if not low <= value <= high:
        raise ApiError(400, f"{name}: expected {low}..{high}, got {value}", name)
    return value


@bp.get("/runs/<run_id>/series")
def series(run_id: str) -> Response:
    """Per-second (or per-window) rows: `?by=run|group|name&window=N` (harness.report.per_second)."""
    run = _stored_run(run_id)
    by = request.args.get("by", "run")
    if by not in ("run", "group", "name"):
        raise ApiError(400, f"by: expected run, group or name, got {by!r}", "by")
    window = _int_arg("window", 1, 1, MAX_WINDOW)
    rows = per_second(get_store(), run.id, window=window, by=by)
    return jsonify(run_id=run.id, by=by, window=window, started_at=run.started_at, rows=rows)


@bp.get("/runs/<run_id>/events")
def events(run_id: str) -> Response:
    """The run's timeline: lifecycle events and operator actions (with who)."""
    run = _stored_run(run_id)
    return jsonify(run_id=run.id, events=_redact_strings(get_store().events(run.id)))


@bp.get("/runs/<run_id>/errors")
def errors(run_id: str) -> Response:
    """Distinct errors with counts, most frequent first."""
    run = _stored_run(run_id)
    return jsonify(run_id=run.id, errors=get_store().errors(run.id))


@bp.get("/runs/<run_id>/datapoints")
def datapoints(run_id: str) -> Response:
    """The latest data point of each entity (`?limit=200`), newest first."""
    run = _stored_run(run_id)
    limit = _int_arg("limit", 200, 1, 5000)
    rows = get_store().rows(
        'SELECT d.t, d."group", d.entity, d.values_json FROM datapoint d JOIN '
        '(SELECT MAX(id) AS id FROM datapoint WHERE run_id=:r GROUP BY "group", entity) m ON d.id = m.id '
        "ORDER BY d.t DESC, d.entity LIMIT :limit",
        r=run.id,
        limit=limit,
    )
    points = [
        {"t": r["t"], "group": r["group"], "entity": r["entity"], "values": json.loads(r["values_json"])}
        for r in rows
    ]
    return jsonify(run_id=run.id, datapoints=points)


PEER_FAMILIES = ("sent", "received", "relayed", "all", "relevant", "duplicate", "expired")
"""The packet families a WebRTC peer's data point counts (simulators/webrtc; `{F}PerSecond`, …)."""
PEER_RATES = tuple(f"{f}{unit}" for f in PEER_FAMILIES for unit in ("PerSecond", "BytesPerSecond"))
PEER_HOLD_S = 5.0
"""A peer with no data point in a bucket still counts with its last one if that is this recent."""


def _since_arg() -> float | None:
    text = request.args.get("since")
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ApiError(400, f"since: expected seconds since the run started, got {text!r}", "since") from None
    if not math.isfinite(value) or value < 0:
        raise ApiError(400, f"since: expected a number of seconds >= 0, got {text!r}", "since")
    return value


def _num(value: Any) -> float | None:
    """A number from a data point (None for anything else, booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _peer_row(row: dict[str, Any], started: float, newest: float) -> dict[str, Any]:
    """One peer's latest data point as the panel's table shows it."""
    v = json.loads(row["values_json"])
    if not isinstance(v, dict):
        v = {}
    connected = v.get("connectedPeers")
    position = v.get("position")
    rtc = v.get("webrtc")
    if not isinstance(rtc, dict):
        rtc = {}
    out: dict[str, Any] = {
        "peer": row["entity"],
        "group": row["group"],
        "kind": str(v.get("kind") or "aiortc"),
        "routine": str(v.get("routine") or ""),
        "connected": len(connected) if isinstance(connected, list) else None,
        "known": _num(v.get("knownPeersCount")),
    }
    for family in PEER_FAMILIES:
        out[f"{family}_per_s"] = _num(v.get(f"{family}PerSecond"))
    out["sent_bytes_per_s"] = _num(v.get("sentBytesPerSecond"))
    out["received_bytes_per_s"] = _num(v.get("receivedBytesPerSecond"))
    out["latency_ms"] = _num(v.get("averageLatency"))
    out["rtt_ms"] = _num(rtc.get("rttMs"))
    out["memory_mb"] = _num(v.get("memoryMB"))
    out["position"] = (
        [_num(p) for p in position[:3]] if isinstance(position, list) and len(position) >= 3 else None
    )
    out["last_seen"] = round(row["t"] - started, 3)
    out["age_s"] = round(newest - row["t"], 3)
    return out


def _peer_series(
    rows: Sequence[Sequence[Any]], started: float, bucket: int, first: int, by_group: bool
) -> list[dict[str, Any]]:
    """Per bucket (and group): the sum over peers of each rate in PEER_RATES.

    `rows` are `(t, group, entity, *rates)` ordered by t. A peer's points within one bucket are
    averaged; a peer with none in a bucket counts with its last value while that is at most
    PEER_HOLD_S older than the bucket (a report that slipped over a bucket edge makes no dip).
    Buckets before `first` only prime that hold."""
    per: dict[int, dict[tuple[str, str], list[Any]]] = {}
    for r in rows:
        t = r[0]
        cells = per.setdefault(int((t - started) // bucket), {})
        key = (r[1], r[2])
        cell = cells.get(key)
        if cell is None:
            cells[key] = [1, list(r[3:]), t]
        else:
            cell[0] += 1
            cell[1] = [a + v for a, v in zip(cell[1], r[3:], strict=True)]
            cell[2] = t
    zero = [0.0] * len(PEER_RATES)
    last: dict[tuple[str, str], tuple[float, list[float]]] = {}
    totals: dict[str | None, list[Any]] = {}  # group (None: the run) → [peers, sums]; kept running
    out: list[dict[str, Any]] = []
    for b in sorted(per):
        cells = per[b]
        for peer, (n, sums, t) in cells.items():
            means = sums if n == 1 else [s / n for s in sums]
            acc = totals.setdefault(peer[0] if by_group else None, [0, zero])
            old = last.get(peer)
            if old is None:
                acc[0] += 1
                acc[1] = [a + m for a, m in zip(acc[1], means, strict=True)]
            else:
                acc[1] = [a - o + m for a, o, m in zip(acc[1], old[1], means, strict=True)]
            last[peer] = (t, means)
        start = started + b * bucket
        for peer in [p for p, (t, _) in last.items() if p not in cells and start - t > PEER_HOLD_S]:
            _t, means = last.pop(peer)
            acc = totals[peer[0] if by_group else None]
            acc[0] -= 1
            acc[1] = [a - m for a, m in zip(acc[1], means, strict=True)] if acc[0] else zero
        if b < first:
            continue
        for group in sorted(totals, key=lambda g: g or ""):
            n, sums = totals[group]
            if not n:
                continue
            row: dict[str, Any] = {"t": b * bucket, "group": group, "peers": n}
            row.update({key: round(s, 3) + 0.0 for key, s in zip(PEER_RATES, sums, strict=True)})
            out.append(row)
    return out


@bp.get("/runs/<run_id>/peers")
def peers(run_id: str) -> Response:
    """WebRTC peers (data points with `sentTotal`): the latest data point of each peer as a table row,
    and the seven packet families over time.

    `?bucket=2` seconds per time bucket (1..3600); `?by=run|group`: one series row per bucket, or per
    bucket and group; `?since=S` (seconds since the run started): only buckets from S on, for
    incremental fetches (ask again from the last bucket you have: it may have grown); `?limit=900`
    buckets at most (the newest); `?peers=1000` table rows at most (0: no table).

    → `{run_id, started_at, bucket, by, families, peers: [{peer, group, kind, routine, connected, known,
    sent_per_s, received_per_s, relayed_per_s, all_per_s, relevant_per_s, duplicate_per_s,
    expired_per_s, sent_bytes_per_s, received_bytes_per_s, latency_ms, rtt_ms, memory_mb, position,
    last_seen, age_s}], series: [{t, group, peers, sentPerSecond, sentBytesPerSecond, …}], last_t,
    truncated}`. Times are seconds since the run started; `series[].{F}PerSecond` is the sum over peers
    of their `{F}PerSecond` (a peer's points within one bucket averaged). A run without peer data
    points answers empty lists.
    """
    run = _stored_run(run_id)
    bucket = _int_arg("bucket", 2, 1, MAX_WINDOW)
    by = request.args.get("by", "run")
    if by not in ("run", "group"):
        raise ApiError(400, f"by: expected run or group, got {by!r}", "by")
    since = _since_arg()
    limit = _int_arg("limit", 900, 1, 100000)
    max_peers = _int_arg("peers", 1000, 0, 10000)
    store = get_store()
    started = run.started_at
    body: dict[str, Any] = {
        "run_id": run.id,
        "started_at": started,
        "bucket": bucket,
        "by": by,
        "families": list(PEER_FAMILIES),
        "peers": [],
        "series": [],
        "last_t": None,
        "truncated": False,
    }
    # each peer's latest data point (since `since`: the client keeps the peers it has); the time
    # condition comes before the JSON one so that SQLite parses only the rows it has to
    latest = store.rows(
        'SELECT d.id, d.t, d."group", d.entity FROM datapoint d JOIN (SELECT MAX(id) AS id FROM datapoint '
        'WHERE run_id=:r AND t >= :tmin GROUP BY "group", entity) m ON d.id = m.id '
        f"WHERE {store.json_value('d.values_json', 'sentTotal')} IS NOT NULL "
        'ORDER BY d."group", d.entity',
        r=run.id,
        tmin=started + (since or 0.0) if since is not None else float("-inf"),
    )
    if not latest:
        return jsonify(body)
    newest = max(r["t"] for r in latest)
    body["last_t"] = round(newest - started, 3)
    body["truncated"] = len(latest) > max_peers
    shown = latest[:max_peers]
    if shown:
        values = {
            r["id"]: r["values_json"]
            for r in store.rows(
                f"SELECT id, values_json FROM datapoint WHERE id IN ({store.ids_in('ids')})",
                ids=json.dumps([r["id"] for r in shown]),
            )
        }
        body["peers"] = [
            _peer_row({**r, "values_json": values.get(r["id"], "{}")}, started, newest) for r in shown
        ]
    # the buckets to answer: from `since` (else the newest `limit`), reading PEER_HOLD_S more for the hold
    last_bucket = int((newest - started) // bucket)
    first = max(0, last_bucket - limit + 1)
    if since is not None:
        first = max(first, int(since // bucket))
    columns = ", ".join(f"COALESCE({store.json_number('values_json', key)}, 0.0)" for key in PEER_RATES)
    with store.engine.connect() as conn:  # plain tuples: up to peers × buckets rows
        rows = conn.execute(
            text(
                f'SELECT t, "group", entity, {columns} FROM datapoint WHERE run_id=:r AND t >= :start '
                f"AND {store.json_value('values_json', 'sentTotal')} IS NOT NULL ORDER BY t, id"
            ),
            {"r": run.id, "start": started + first * bucket - PEER_HOLD_S},
        ).all()
    body["series"] = _peer_series(rows, started, bucket, first, by == "group")
    return jsonify(body)


def _report_folder(run: Run, summary: dict[str, Any]) -> Path:
    if summary.get("report_dir"):
        return Path(summary["report_dir"])
    return get_store().path.parent / "runs" / run.id


def _write_report(store: Store, run: Run, fmt: str, folder: Path, summary: dict[str, Any]) -> Path:
    """Generate a missing report file into the run's report folder (what `harness report` does)."""
    path = folder / REPORT_FILES[fmt]
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    elif fmt == "junit":
        from harness.report.junit import write_junit

        write_junit(summary, path)
    elif fmt == "csv":
        from harness.report.csv import write_csv_reports

        write_csv_reports(store, run.id, folder)
    else:
        from harness.report.html import write_html
        from harness.timeline import analyze_timeline, auto_window

        timeline = analyze_timeline(store, run.id, auto_window(float(summary.get("duration_s") or 0)))
        write_html(store, run.id, path, summary=summary, timeline=timeline)
    return path


@bp.get("/runs/<run_id>/report/<fmt>")
def report(run_id: str, fmt: str) -> Response:
    """Download a finished run's report: html, json (summary.json), junit or csv (stats.csv)."""
    if fmt not in REPORT_FILES:
        raise ApiError(404, f"no report format {fmt!r}: html, json, junit or csv", "fmt")
    run, record = _find_run(run_id)
    if run is None or (record is not None and record.active) or run.status == "running":
        raise ApiError(409, f"run {run_id} has not finished: its reports are written when it ends")
    store = get_store()
    summary = _summary(store, run) or {}
    folder = _report_folder(run, summary)
    path = folder / REPORT_FILES[fmt]
    if not path.is_file():
        path = _write_report(store, run, fmt, folder, summary)
    inline = request.args.get("download") == "0"
    response = send_file(
        path,
        mimetype=REPORT_TYPES[fmt],
        as_attachment=not inline,
        download_name=f"{run.id}-{REPORT_FILES[fmt]}",
        max_age=0,
    )
    # the HTML report runs its own scripts: give it an opaque origin, never the panel's cookies
    response.headers["Content-Security-Policy"] = "sandbox allow-scripts"
    return response


@bp.post("/runs/<run_id>/baseline")
def mark_baseline(run_id: str) -> Response:
    """Make a finished run the baseline of its profile (later runs are compared with it)."""
    run, record = _find_run(run_id)
    if run is None:
        raise ApiError(404, f"run {run_id} has no recorded data (it did not start)")
    if (record is not None and record.active) or run.status == "running":
        raise ApiError(409, f"run {run.id} has not finished: mark it when it has ended")
    store = get_store()
    store.set_baseline(run.profile, run.id)
    who = _who()
    store.add_events(run.id, [{"t": time.time(), "type": "baseline_marked", "detail": {"who": who}}])
    return jsonify(run_id=run.id, profile=run.profile, baseline=True, who=who)


@bp.get("/compare")
def compare() -> Response:
    """`?run=A&baseline=B` (B defaults to A's profile's marked baseline): harness.compare's result."""
    current = request.args.get("run")
    if not current:
        raise ApiError(400, "run: expected a run id", "run")
    baseline = request.args.get("baseline") or None
    for field, ref in (("run", current), ("baseline", baseline)):
        if ref is not None and looks_like_file(ref):
            raise ApiError(400, f"{field}: expected a run id, got {ref!r}", field)
    limits = Limits(
        p95_pct=_float_arg("p95", 20.0),
        p99_pct=_float_arg("p99", 20.0),
        error_rate_pp=_float_arg("error_rate", 5.0),
    )
    store = get_store()
    for field, ref in (("run", current), ("baseline", baseline)):
        if ref is not None and store.get_run(ref) is None:
            raise ApiError(404, f"{field}: no run matches {ref!r}", field)
    try:
        result = compare_runs(store, current, baseline, limits)
    except UsageError as exc:
        raise ApiError(400, str(exc), "baseline") from None
    return jsonify(_redact_strings(result))


def _float_arg(name: str, default: float) -> float:
    text = request.args.get(name)
    if text is None:
        return default
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise ApiError(400, f"{name}: expected a number, got {text!r}", name) from None
    if not math.isfinite(value) or value < 0:
        raise ApiError(400, f"{name}: expected a number >= 0", name)
    return value


__all__ = ["ApiError", "bp"]


@bp.get("/agents")
def list_agents() -> Response:
    """Agents connected to this panel's hub (and those that dropped out recently): name, labels,
    capacity, clock offset, health (ok | silent | disconnected), the run that holds each, its workers,
    and its outbox (relayed messages not yet acknowledged) and dropped count."""
    hub = current_app.extensions.get("harness_agents")
    return jsonify(agents=hub.view() if hub is not None else [], clock_warning_s=CLOCK_WARNING_S)
