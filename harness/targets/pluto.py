"""The `pluto` target: the mlop/pluto ML-metrics stack on one port, as the pluto-ml SDK and raw HTTP call it.

Three services of `Trainy-ai/pluto-server` behind one service model:

- the API server (`:3001` in the original): `POST /api/slug` (login check), `POST /api/runs/create`
  (an `externalId` already seen in the project gives back that run with `resumed: true`),
  `POST /api/runs/resume` (by `runId`, `displayId` or `externalId` + `projectName`; the run is
  RUNNING again), `POST /api/runs/status/update`, `/logName/add`, `/tags/update`, `/config/update`
  and `/modelGraph/create`, each 404 for an unknown run. Errors are `{"error": ...}`; a missing or
  unknown key is 401.
- the Rust ingest service (`:3003`): `POST /ingest/metrics|logs|data` take NDJSON validated line by
  line as the original's serde models do (unknown fields denied, `u64` integers, metric values as
  numbers, `null` (skipped) or the strings `"NaN"`, `"Infinity"`, `"-Infinity"`, empty `data`
  rejected, blank lines skipped) and answer `Stream processed successfully: N records`, N counting
  metric points, log lines or data records. `Authorization` must be `Bearer <token>` (401),
  `X-Run-Id` and `X-Project-Name` must be present (400); a non-numeric run id is run 0, as in the
  original. `POST /files` answers presigned-looking upload URLs on this server, which `PUT` accepts.
  `GET /health`, `/health/ready`, `/health/dlq`, `/version`.
- the heartbeat service (`:3004`): `POST /api/runs/trigger {runId}` → `{"status"}` (CANCELLED for
  `cancel_runs`, which also cancels the run), `POST /api/runs/alert`.

A request with a bad line is rejected whole: nothing of it is stored (the original streams lines into
its writers and keeps those before the bad one; `keep_lines_before_error` does that), so that a client
that re-sends a rejected batch creates no duplicates, and a duplicate seen here is a real re-send.
Where the original answers 422 for every failure of an ingest stream (its handler wraps them all),
this target answers 401 for auth, 400 for headers and bad lines: the statuses a client can act on.

Every run keeps its metadata, status history and log names, and every metric point by (step, key)
with its value, how many times it arrived and when it first did (`time.time()`), up to `max_points`
in all (beyond it points are counted, not stored); log lines and data records are counted.
`GET /_runs`, `GET /_runs/{id}`, `GET /_runs/{id}/points?key=K` show them and `GET /_stats` the service
model's counters with the target's under `pluto`; those, the health routes and the uploads bypass the
service model.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import math
import re
import secrets
import time
import urllib.parse
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import Field

from harness.distributions import Distribution
from harness.durations import Duration
from harness.targets.service import SERVICE_MODEL, ServiceModel, ServiceModelConfig, service_middleware

KINDS = ("metrics", "logs", "data")
"""The three NDJSON ingest routes, `/ingest/{kind}`."""

RUN_STATUSES = ("RUNNING", "COMPLETED", "FAILED", "TERMINATED", "CANCELLED")
"""The original's `RunStatus` enum: what `/api/runs/status/update` accepts."""

MAX_BODY = 64 * 1024 * 1024
MAX_LOG_NAMES = 10_000
MAX_STATUS_HISTORY = 100
U64_MAX = 2**64 - 1
_YIELD_EVERY = 2000
_TOKEN = re.compile(r"^[A-Za-z0-9._-]+$")
_U64 = re.compile(r"^\+?[0-9]+$")
_DISPLAY_ID = re.compile(r"^([^-]+)-(\d+)$")
_OPEN_PATHS = frozenset({"/health", "/health/ready", "/health/dlq", "/version", "/_stats", "/_runs"})
_OPEN_PREFIXES = ("/_runs/", "/_uploads/")
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class PlutoConfig(ServiceModelConfig):
    """The configuration of the `pluto` target."""

    concurrency: int = Field(default=64, ge=1)
    """How many requests are served at once (an ingest request holds its worker while it works)."""

    queue_limit: int = Field(default=1024, ge=0)
    """How many requests may wait for a free worker; any beyond this get 503 at once."""

    service_time: Distribution = Field(default=0.002, validate_default=True)
    """The time every request costs before its route's own work."""

    seed: int | None = 0
    """Seeds the service-time and error sampling; none means random."""

    api_keys: list[str] | None = None
    """The API keys accepted as `Authorization: Bearer <key>`; none accepts any non-empty key. Anything
    else is 401 on every route but health, version and the `_` routes."""

    organization: str = Field(default="local-org", min_length=1)
    """The organization slug `/api/slug` reports and run URLs name."""

    record_time: Duration = 20e-6
    """Extra service time per ingested record (metric point, log line or data record), so that bigger
    requests cost more; spent after `service_time`, holding the worker."""

    max_points: int = Field(default=2_000_000, ge=0)
    """How many metric points are stored in all (about 130 bytes each); beyond it new points are
    accepted and counted (`points_dropped`) but not stored, and `/_stats` says `points_capped`."""

    max_runs: int = Field(default=10_000, ge=1)
    """How many runs are kept; beyond it the oldest is forgotten with its points (`evicted_runs`)."""

    cancel_runs: list[int] = Field(default_factory=list)
    """Run ids whose heartbeat (`/api/runs/trigger`) answers CANCELLED, which cancels the run; the
    SDK then exits the training process. Other runs get their own status, RUNNING while they run."""

    keep_lines_before_error: bool = False
    """Store the records before a bad NDJSON line, as the original's streaming does, instead of
    rejecting the whole request with nothing stored. Either way the answer is 400."""


# --- state ----------------------------------------------------------------------------------------


class Series:
    """One metric of one run: every stored point by step, in compact arrays."""

    __slots__ = ("counts", "first", "index", "times", "values")

    def __init__(self) -> None:
        self.index: dict[int, int] = {}
        """Step → slot in the arrays."""
        self.values = array("d")
        self.counts = array("I")
        self.first = array("d")
        """`time.time()` of each point's first arrival."""
        self.times = array("Q")
        """The `time` field (ms) each point first came with."""


@dataclass(eq=False)
class Run:
    """One run: created through the API, or first seen by the ingest under an unknown `X-Run-Id`."""

    id: int
    project: str
    name: str | None = None
    source: str = "api"
    external_id: str | None = None
    number: int | None = None
    display_id: str | None = None
    status: str | None = None
    created_at: float = field(default_factory=time.time)
    tags: list[str] = field(default_factory=list)
    config: Any = None
    logger_settings: Any = None
    system_metadata_bytes: int = 0
    status_history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_STATUS_HISTORY))
    log_names: dict[str, str] = field(default_factory=dict)
    log_names_dropped: int = 0
    graph_nodes: int = 0
    series: dict[str, Series] = field(default_factory=dict)
    steps: set[int] = field(default_factory=set)
    points: int = 0
    duplicate_points: int = 0
    points_dropped: int = 0
    log_lines: int = 0
    data_records: int = 0
    files_presigned: int = 0
    files_uploaded: int = 0
    upload_bytes: int = 0
    heartbeats: int = 0
    last_heartbeat: float | None = None
    alerts: int = 0

    def set_status(self, status: str, source: str, metadata: Any = None) -> None:
        """Move to `status`, remembering when and why in the (bounded) history."""
        self.status = status
        entry: dict[str, Any] = {"status": status, "at": time.time(), "source": source}
        if metadata is not None:
            entry["metadata"] = metadata
        self.status_history.append(entry)

    def summary(self) -> dict[str, Any]:
        """What `GET /_runs` lists for this run."""
        return {
            "id": self.id,
            "name": self.name,
            "project": self.project,
            "status": self.status,
            "source": self.source,
            "display_id": self.display_id,
            "external_id": self.external_id,
            "points": self.points,
            "duplicate_points": self.duplicate_points,
            "points_dropped": self.points_dropped,
            "steps": len(self.steps),
            "keys": len(self.series),
            "log_lines": self.log_lines,
            "data_records": self.data_records,
            "heartbeats": self.heartbeats,
        }

    def detail(self) -> dict[str, Any]:
        """What `GET /_runs/{id}` shows: the summary and the run's metadata."""
        return {
            **self.summary(),
            "number": self.number,
            "created_at": self.created_at,
            "tags": self.tags,
            "config": self.config,
            "logger_settings": self.logger_settings,
            "system_metadata_bytes": self.system_metadata_bytes,
            "status_history": list(self.status_history),
            "log_names": self.log_names,
            "log_names_dropped": self.log_names_dropped,
            "graph_nodes": self.graph_nodes,
            "max_step": max(self.steps) if self.steps else None,
            "files_presigned": self.files_presigned,
            "files_uploaded": self.files_uploaded,
            "upload_bytes": self.upload_bytes,
            "last_heartbeat": self.last_heartbeat,
            "alerts": self.alerts,
        }


@dataclass
class Project:
    """A project: its display-id prefix and the number its next run gets."""

    prefix: str
    next_number: int = 1


MetricRow = tuple[int, int, dict[str, float]]
"""A parsed metrics line: time (ms), step and the points by key."""


class PlutoState:
    """Everything one `pluto` app holds: runs, projects, points and counters."""

    def __init__(self, config: PlutoConfig) -> None:
        self.config = config
        self.keys = frozenset(config.api_keys) if config.api_keys is not None else None
        self.cancel = frozenset(config.cancel_runs)
        self.secret = secrets.token_bytes(16)
        self.runs: OrderedDict[int, Run] = OrderedDict()
        self.projects: OrderedDict[str, Project] = OrderedDict()
        self.prefixes: dict[str, str] = {}
        """Display-id prefix → project name."""
        self.external_ids: dict[tuple[str, str], int] = {}
        self._ids = itertools.count(1)
        self.points_stored = 0
        self.requests: Counter[str] = Counter(dict.fromkeys(KINDS, 0))
        self.requests_rejected: Counter[str] = Counter(dict.fromkeys(KINDS, 0))
        self.records_accepted: Counter[str] = Counter(dict.fromkeys(KINDS, 0))
        self.records_discarded: Counter[str] = Counter(dict.fromkeys(KINDS, 0))
        self.api_calls: Counter[str] = Counter()
        self.counters: Counter[str] = Counter(
            dict.fromkeys(
                (
                    "points_dropped",
                    "duplicate_points",
                    "unauthenticated",
                    "evicted_runs",
                    "heartbeats",
                    "cancelled_by_heartbeat",
                    "alerts",
                    "files_presigned",
                    "files_uploaded",
                    "upload_bytes",
                    "bad_signatures",
                ),
                0,
            )
        )

    # -- auth

    def accepts(self, token: str) -> bool:
        """Whether `token` is a valid API key."""
        return bool(token) and (self.keys is None or token in self.keys)

    # -- runs

    def _add_run(self, run: Run) -> Run:
        self.runs[run.id] = run
        while len(self.runs) > self.config.max_runs:
            _, old = self.runs.popitem(last=False)
            self.points_stored -= old.points
            if (
                old.external_id is not None
                and self.external_ids.get((old.project, old.external_id)) == old.id
            ):
                del self.external_ids[(old.project, old.external_id)]
            self.counters["evicted_runs"] += 1
        return run

    def _project(self, name: str) -> Project:
        project = self.projects.get(name)
        if project is None:
            base = run_prefix(name)
            prefix, n = base, 1
            while prefix in self.prefixes and self.prefixes[prefix] != name:
                n += 1
                prefix = f"{base}{n}"
            self.prefixes[prefix] = name
            project = self.projects[name] = Project(prefix)
            if len(self.projects) > self.config.max_runs:  # bounded: a forgotten project numbers anew
                old_name, old = self.projects.popitem(last=False)
                if self.prefixes.get(old.prefix) == old_name:
                    del self.prefixes[old.prefix]
        else:
            self.projects.move_to_end(name)
        return project

    def create_run(self, name: str, project_name: str, external_id: str | None) -> Run:
        """A new RUNNING run with the next free id and the project's next display id."""
        run_id = next(self._ids)
        while run_id in self.runs:  # taken by a run the ingest saw first
            run_id = next(self._ids)
        project = self._project(project_name)
        number = project.next_number
        project.next_number += 1
        run = Run(
            id=run_id,
            project=project_name,
            name=name,
            external_id=external_id,
            number=number,
            display_id=f"{project.prefix}-{number}",
        )
        run.set_status("RUNNING", "create")
        if external_id is not None:
            self.external_ids[(project_name, external_id)] = run_id
        return self._add_run(run)

    def by_external_id(self, project: str, external_id: str) -> Run | None:
        """The run created with `external_id` in `project`, if still kept."""
        run_id = self.external_ids.get((project, external_id))
        return None if run_id is None else self.runs.get(run_id)

    def by_display_id(self, display_id: str) -> Run | None:
        """The run called `display_id` (`PREFIX-NUMBER`), if still kept."""
        match = _DISPLAY_ID.match(display_id)
        if match is None:
            return None
        project = self.prefixes.get(match.group(1).upper())
        if project is None:
            return None
        number = int(match.group(2))
        return next((r for r in self.runs.values() if r.project == project and r.number == number), None)

    def ingest_run(self, run_id: int, project: str) -> Run:
        """The run the ingest writes to: a known one, or a new one it has not heard of before."""
        run = self.runs.get(run_id)
        if run is None:
            run = self._add_run(Run(id=run_id, project=project, source="ingest"))
        return run

    # -- ingest

    def add_metrics(self, run: Run, rows: list[MetricRow], now: float) -> None:
        """Store `rows`' points: new ones up to `max_points`, repeats counted as duplicates."""
        cap = self.config.max_points
        duplicates = dropped = added = 0
        for time_ms, step, data in rows:
            for key, value in data.items():
                series = run.series.get(key)
                slot = None if series is None else series.index.get(step)
                if slot is not None:
                    assert series is not None
                    series.counts[slot] += 1
                    duplicates += 1
                elif self.points_stored + added >= cap:
                    dropped += 1
                else:
                    if series is None:
                        series = run.series[key] = Series()
                    series.index[step] = len(series.values)
                    series.values.append(value)
                    series.counts.append(1)
                    series.first.append(now)
                    series.times.append(time_ms)
                    run.steps.add(step)
                    added += 1
        run.points += added
        run.duplicate_points += duplicates
        run.points_dropped += dropped
        self.points_stored += added
        self.counters["duplicate_points"] += duplicates
        self.counters["points_dropped"] += dropped

    def points(self, run: Run, keys: list[str], with_time: bool) -> list[list[Any]]:
        """`[step, key, value, count, first_arrival(, time)]` for `keys` (all when empty), by key and step."""
        rows: list[list[Any]] = []
        for key in sorted(keys or run.series):
            series = run.series.get(key)
            if series is None:
                continue
            for step, slot in sorted(series.index.items()):
                row = [step, key, _json_float(series.values[slot]), series.counts[slot], series.first[slot]]
                if with_time:
                    row.append(series.times[slot])
                rows.append(row)
        return rows

    def stats(self) -> dict[str, Any]:
        """The target's counters (under `pluto` in `/_stats`)."""
        by_status = Counter(run.status or "UNKNOWN" for run in self.runs.values())
        return {
            "requests": dict(self.requests),
            "requests_rejected": dict(self.requests_rejected),
            "records_accepted": dict(self.records_accepted),
            "records_discarded": dict(self.records_discarded),
            "points_stored": self.points_stored,
            "max_points": self.config.max_points,
            "points_capped": self.counters["points_dropped"] > 0,
            "runs": len(self.runs),
            "runs_by_status": dict(sorted(by_status.items())),
            "api_calls": dict(sorted(self.api_calls.items())),
            **self.counters,
        }


STATE = web.AppKey("pluto_state", PlutoState)


def run_prefix(project: str) -> str:
    """A display-id prefix for `project`: the initials of its words, or its first letters, upper case."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", project) if w]
    if len(words) >= 2:
        prefix = "".join(w[0] for w in words[:4])
    elif words:
        prefix = words[0][:3]
    else:
        prefix = "RUN"
    return prefix.upper()


def _json_float(value: float) -> float | str:
    """`value` for JSON: the wire protocol's strings for the non-finite ones."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


# --- NDJSON validation, as the ingest's serde models ----------------------------------------------


class LineError(Exception):
    """A line the ingest rejects: its error code, the field at fault and what is wrong."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


def _describe(value: Any) -> str:
    """How serde names an unexpected JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, list):
        return "sequence"
    return "map"


def _u64(obj: dict[str, Any], name: str) -> int:
    value = obj[name]
    if type(value) is int and 0 <= value <= U64_MAX:
        return value
    if type(value) is int:
        raise LineError("STREAM_DECODING_ERROR", f"invalid value: integer `{value}`, expected u64", name)
    raise LineError("STREAM_DECODING_ERROR", f"invalid type: {_describe(value)}, expected u64", name)


def _string(obj: dict[str, Any], name: str) -> str:
    value = obj[name]
    if isinstance(value, str):
        return value
    raise LineError("STREAM_DECODING_ERROR", f"invalid type: {_describe(value)}, expected a string", name)


def _fields(obj: Any, struct: str, fields: tuple[str, ...]) -> dict[str, Any]:
    """`obj` as a struct with exactly `fields`: unknown ones denied, missing ones reported."""
    if not isinstance(obj, dict):
        raise LineError("STREAM_DECODING_ERROR", f"invalid type: {_describe(obj)}, expected struct {struct}")
    for name in obj:
        if name not in fields:
            expected = ", ".join(f"`{f}`" for f in fields)
            raise LineError(
                "STREAM_DECODING_ERROR", f"unknown field `{name}`, expected one of {expected}", name
            )
    for name in fields:
        if name not in obj:
            raise LineError("STREAM_DECODING_ERROR", f"missing field `{name}`", name)
    return obj


def _metric_value(key: str, value: Any) -> float | None:
    if value is None:
        return None  # skipped, as the original does
    if isinstance(value, str):
        special = _SPECIAL_FLOATS.get(value)
        if special is None:
            raise LineError(
                "STREAM_DECODING_ERROR", f"unexpected string metric value: '{value}'", f"data.{key}"
            )
        return special
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LineError(
            "STREAM_DECODING_ERROR",
            f"invalid type: {_describe(value)}, expected a number or special float string "
            "(NaN, Infinity, -Infinity)",
            f"data.{key}",
        )
    try:
        return float(value)
    except OverflowError:
        raise LineError("STREAM_DECODING_ERROR", f"number out of range: {value}", f"data.{key}") from None


def parse_metric(obj: Any) -> MetricRow:
    """A metrics line (`MetricInput`): `{time: u64, step: u64, data: {str: f64}}`."""
    obj = _fields(obj, "MetricInput", ("time", "step", "data"))
    time_ms = _u64(obj, "time")
    step = _u64(obj, "step")
    raw = obj["data"]
    if not isinstance(raw, dict):
        raise LineError("STREAM_DECODING_ERROR", f"invalid type: {_describe(raw)}, expected a map", "data")
    data: dict[str, float] = {}
    for key, value in raw.items():
        number = _metric_value(key, value)
        if number is not None:
            data[key] = number
    if not data:
        raise LineError("INVALID_METRIC_FORMAT", "'data' field cannot be empty", "data")
    if any(not key.strip() for key in data):
        raise LineError("INVALID_METRIC_FORMAT", "metric name cannot be empty", "data")
    return time_ms, step, data


def parse_log(obj: Any) -> tuple[int, str, int, str]:
    """A logs line (`LogInput`): `{time, message, lineNumber, logType}`."""
    obj = _fields(obj, "LogInput", ("time", "message", "lineNumber", "logType"))
    row = (_u64(obj, "time"), _string(obj, "message"), _u64(obj, "lineNumber"), _string(obj, "logType"))
    if not row[3].strip():
        raise LineError("INVALID_LOG_FORMAT", "'logType' field cannot be empty", "logType")
    return row


def parse_data(obj: Any) -> tuple[int, str, int, str, str]:
    """A data line (`DataInput`): `{time, data: String, step, dataType, logName}`."""
    obj = _fields(obj, "DataInput", ("time", "data", "step", "dataType", "logName"))
    row = (
        _u64(obj, "time"),
        _string(obj, "data"),
        _u64(obj, "step"),
        _string(obj, "dataType"),
        _string(obj, "logName"),
    )
    if not row[3].strip():
        raise LineError("INVALID_LOG_FORMAT", "'dataType' field cannot be empty", "dataType")
    if not row[4].strip():
        raise LineError("INVALID_LOG_FORMAT", "'logName' field cannot be empty", "logName")
    return row


_PARSERS: dict[str, Callable[[Any], Any]] = {"metrics": parse_metric, "logs": parse_log, "data": parse_data}


@dataclass
class Parsed:
    """An NDJSON body: the rows of its good lines, how many records they hold, and the first error."""

    rows: list[Any]
    records: int
    error: LineError | None = None
    line: int = 0


async def parse_ndjson(kind: str, body: bytes) -> Parsed:
    """Parse and validate `body` line by line (1-based, blank lines counted), stopping at a bad line."""
    parse = _PARSERS[kind]
    rows: list[Any] = []
    records = 0
    for number, raw in enumerate(body.split(b"\n"), 1):
        if number % _YIELD_EVERY == 0:
            await asyncio.sleep(0)  # a huge body must not stall the other requests
        line = raw.strip(b" \t\r")
        if not line:
            continue
        try:
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise LineError("STREAM_DECODING_ERROR", f"invalid UTF-8: {exc.reason}") from None
            except json.JSONDecodeError as exc:
                preview = line[:100].decode("utf-8", "replace")
                raise LineError(
                    "STREAM_DECODING_ERROR", f"invalid JSON {preview!r}: {exc.msg} at column {exc.colno}"
                ) from None
            row = parse(obj)
        except LineError as exc:
            return Parsed(rows, records, exc, number)
        rows.append(row)
        records += len(row[2]) if kind == "metrics" else 1
    return Parsed(rows, records)


# --- helpers --------------------------------------------------------------------------------------


class Invalid(Exception):
    """A request the API refuses: its status and JSON body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def _bad(message: str) -> Invalid:
    return Invalid(400, {"error": message})


def _not_found() -> Invalid:
    return Invalid(404, {"error": "Run not found"})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refusals(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Invalid as exc:
            return web.json_response(exc.body, status=exc.status)

    return wrapped


async def _json_object(request: web.Request, error: Callable[[str], Invalid] = _bad) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise error("Malformed JSON in request body") from None
    if not isinstance(body, dict):
        raise error("The request body must be a JSON object")
    return body


def _field_int(body: dict[str, Any], name: str, error: Callable[[str], Invalid] = _bad) -> int:
    value = body.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise error(f"{name}: expected a number, got {_describe(value)}")
    return value


def _field_str(body: dict[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _bad(f"{name}: expected a string, got {_describe(value)}")
    return value


def _field_json(body: dict[str, Any], name: str) -> Any:
    """A field holding JSON as a string (or null): its parsed value."""
    raw = _field_str(body, name, optional=True)
    if raw is None or raw == "null":
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise _bad(f"Invalid {name} JSON") from None


def _field_tags(body: dict[str, Any]) -> list[str] | None:
    tags = body.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _bad("tags: expected an array of strings")
    return tags


def _deep_merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in new.items():
        old = merged.get(key)
        merged[key] = _deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def _api_key(request: web.Request) -> str | None:
    """The key as the API server's middleware reads it: the second word of `Authorization`."""
    parts = request.headers.get("Authorization", "").split(" ")
    return parts[1] if len(parts) > 1 and parts[1] else None


def _authorize_api(request: web.Request) -> None:
    state = request.app[STATE]
    key = _api_key(request)
    if key is None:
        state.counters["unauthenticated"] += 1
        raise Invalid(401, {"error": "Unauthorized"})
    if not state.accepts(key):
        state.counters["unauthenticated"] += 1
        raise Invalid(401, {"error": "Unauthorized", "message": "Key not found"})


def _origin(request: web.Request) -> str:
    return str(request.url.origin())


def _run_reply(request: web.Request, run: Run, resumed: bool) -> web.Response:
    state = request.app[STATE]
    org = state.config.organization
    url = f"{_origin(request)}/o/{org}/projects/{urllib.parse.quote(run.project, safe='')}/{run.id}"
    return web.json_response(
        {
            "runId": run.id,
            "number": run.number,
            "displayId": run.display_id,
            "projectName": run.project,
            "organizationSlug": org,
            "url": url,
            "resumed": resumed,
        }
    )


def _find_run(request: web.Request, body: dict[str, Any]) -> Run:
    run = request.app[STATE].runs.get(_field_int(body, "runId"))
    if run is None:
        raise _not_found()
    return run


# --- the API server -------------------------------------------------------------------------------


async def _slug(request: web.Request) -> web.Response:
    _authorize_api(request)
    state = request.app[STATE]
    state.api_calls["slug"] += 1
    return web.json_response({"organization": {"slug": state.config.organization}})


async def _create_run(request: web.Request) -> web.Response:
    _authorize_api(request)
    state = request.app[STATE]
    body = await _json_object(request)
    name = _field_str(body, "runName")
    project = _field_str(body, "projectName")
    assert name is not None and project is not None
    external_id = _field_str(body, "externalId", optional=True)
    if external_id == "":
        raise _bad("externalId: must not be empty")
    tags = _field_tags(body)
    for stamp in ("createdAt", "updatedAt"):
        value = body.get(stamp)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _bad(f"{stamp}: expected a number of milliseconds")
    config = _field_json(body, "config")
    logger_settings = _field_json(body, "loggerSettings")
    system_metadata = _field_str(body, "systemMetadata", optional=True)
    _field_json(body, "systemMetadata")
    state.api_calls["create"] += 1
    if external_id is not None:
        existing = state.by_external_id(project, external_id)
        if existing is not None:
            if isinstance(config, dict):
                existing.config = _deep_merge(
                    existing.config if isinstance(existing.config, dict) else {}, config
                )
            return _run_reply(request, existing, resumed=True)
    run = state.create_run(name, project, external_id)
    run.tags = tags or []
    run.config = config
    run.logger_settings = logger_settings
    run.system_metadata_bytes = len(system_metadata or "")
    return _run_reply(request, run, resumed=False)


async def _resume_run(request: web.Request) -> web.Response:
    _authorize_api(request)
    state = request.app[STATE]
    body = await _json_object(request)
    given = [name for name in ("runId", "displayId", "externalId") if body.get(name) is not None]
    if len(given) != 1:
        raise _bad("Provide exactly one of: runId, displayId, or externalId")
    run: Run | None
    if given[0] == "runId":
        run = state.runs.get(_field_int(body, "runId"))
    elif given[0] == "displayId":
        display_id = _field_str(body, "displayId")
        assert display_id is not None
        if _DISPLAY_ID.match(display_id) is None:
            raise _bad("Invalid displayId format. Expected PREFIX-NUMBER (e.g., 'MMP-1')")
        run = state.by_display_id(display_id)
    else:
        external_id = _field_str(body, "externalId")
        project = _field_str(body, "projectName", optional=True)
        if not project:
            raise _bad("projectName is required when using externalId")
        assert external_id is not None
        run = state.by_external_id(project, external_id)
    if run is None:
        raise _not_found()
    state.api_calls["resume"] += 1
    if run.status != "RUNNING":
        run.set_status("RUNNING", "resume")
    return _run_reply(request, run, resumed=True)


async def _update_status(request: web.Request) -> web.Response:
    _authorize_api(request)
    state = request.app[STATE]
    body = await _json_object(request)
    run_id = _field_int(body, "runId")
    status = body.get("status")
    if status not in RUN_STATUSES:
        raise _bad(f"status: expected one of {', '.join(RUN_STATUSES)}, got {json.dumps(status)}")
    metadata = _field_json(body, "statusMetadata")
    logger_settings = _field_json(body, "loggerSettings")
    run = state.runs.get(run_id)
    if run is None:
        raise _not_found()
    state.api_calls["status"] += 1
    run.set_status(status, "status/update", metadata)
    if isinstance(logger_settings, dict):
        base = run.logger_settings if isinstance(run.logger_settings, dict) else {}
        run.logger_settings = {**base, **logger_settings}
    return web.json_response({"success": True})


async def _add_log_names(request: web.Request) -> web.Response:
    _authorize_api(request)
    state = request.app[STATE]
    body = await _json_object(request)
    names = body.get("logName")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _bad("logName: expected an array of strings")
    log_type = _field_str(body, "logType")
    if not log_type:
        raise _bad("logType: must not be empty")
    run = _find_run(request, body)
    state.api_calls["logName"] += 1
    for name in names:
        if name in run.log_names:
            continue
        if len(run.log_names) >= MAX_LOG_NAMES:
            run.log_names_dropped += 1
        else:
            run.log_names[name] = log_type
    return web.json_response({"success": True})


async def _update_tags(request: web.Request) -> web.Response:
    _authorize_api(request)
    state = request.app[STATE]
    body = await _json_object(request)
    tags = _field_tags(body)
    if tags is None:
        raise _bad("tags: expected an array of strings")
    run = _find_run(request, body)
    state.api_calls["tags"] += 1
    run.tags = tags
    return web.json_response({"success": True})


async def _update_config(request: web.Request) -> web.Response:
    _authorize_api(request)
    state = request.app[STATE]
    body = await _json_object(request)
    config = _field_json(body, "config")
    if config is not None and not isinstance(config, dict):
        raise _bad("Invalid config JSON: expected an object")
    run = _find_run(request, body)
    state.api_calls["config"] += 1
    if config:
        run.config = _deep_merge(run.config if isinstance(run.config, dict) else {}, config)
    return web.json_response({"success": True})


async def _model_graph(request: web.Request) -> web.Response:
    _authorize_api(request)
    state = request.app[STATE]
    body = await _json_object(request)
    graph = body.get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("format"), str):
        raise _bad("graph: expected {format, nodes}")
    nodes = graph.get("nodes")
    if not isinstance(nodes, dict):
        raise _bad("graph.nodes: expected an object")
    run = _find_run(request, body)
    state.api_calls["modelGraph"] += 1
    run.graph_nodes += len(nodes)
    return web.json_response({"success": True})


# --- the heartbeat service (FastAPI in the original: errors are {"detail"}) -----------------------


def _detail(message: str) -> Invalid:
    return Invalid(422, {"detail": message})


def _authorize_py(request: web.Request) -> None:
    state = request.app[STATE]
    key = _api_key(request)
    if key is None or not state.accepts(key):
        state.counters["unauthenticated"] += 1
        raise Invalid(401, {"detail": "Invalid API token"})


def _py_run(request: web.Request, body: dict[str, Any]) -> Run:
    run = request.app[STATE].runs.get(_field_int(body, "runId", _detail))
    if run is None:
        raise Invalid(404, {"detail": "Run not found"})
    return run


async def _trigger(request: web.Request) -> web.Response:
    _authorize_py(request)
    state = request.app[STATE]
    run = _py_run(request, await _json_object(request, _detail))
    state.counters["heartbeats"] += 1
    run.heartbeats += 1
    run.last_heartbeat = time.time()
    if run.id in state.cancel and run.status != "CANCELLED":
        run.set_status("CANCELLED", "trigger")
        state.counters["cancelled_by_heartbeat"] += 1
    return web.json_response({"status": run.status or "RUNNING", "triggers": None})


async def _alert(request: web.Request) -> web.Response:
    _authorize_py(request)
    state = request.app[STATE]
    body = await _json_object(request, _detail)
    run = _py_run(request, body)
    if not isinstance(body.get("alert"), dict):
        raise _detail("alert: expected an object")
    state.counters["alerts"] += 1
    run.alerts += 1
    return web.json_response({"status": "success"})


# --- the ingest service ---------------------------------------------------------------------------


def _ingest_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"code": code, "message": message, **extra}, status=status)


def _ingest_auth(request: web.Request) -> web.Response | None:
    """The ingest's bearer check: 401 unless `Bearer <key>` with a key of accepted characters."""
    state = request.app[STATE]
    header = request.headers.get("Authorization")
    problem: tuple[str, str] | None = None
    if header is None:
        problem = ("MISSING_TOKEN", "Missing Authorization header")
    elif not header.startswith("Bearer "):
        problem = ("INVALID_BEARER_FORMAT", "Authorization header must start with 'Bearer '")
    else:
        token = header[7:].strip()
        if not token:
            problem = ("INVALID_TOKEN", "Bearer token cannot be empty")
        elif _TOKEN.match(token) is None:
            problem = ("INVALID_TOKEN_FORMAT", "Bearer token contains invalid characters")
        elif not state.accepts(token):
            problem = ("INVALID_TOKEN", "Invalid API key")
    if problem is None:
        return None
    state.counters["unauthenticated"] += 1
    return _ingest_error(401, *problem)


def _ingest_headers(request: web.Request) -> tuple[int, str] | web.Response:
    """`X-Run-Id` (a u64; anything else is run 0, as the original parses it) and `X-Project-Name`."""
    raw_id = request.headers.get("X-Run-Id")
    if raw_id is None:
        return _ingest_error(400, "INVALID_HEADER_FORMAT", "Missing required header: X-Run-Id")
    project = request.headers.get("X-Project-Name")
    if project is None:
        return _ingest_error(400, "INVALID_HEADER_FORMAT", "Missing required header: X-Project-Name")
    run_id = int(raw_id) if _U64.match(raw_id) and int(raw_id) <= U64_MAX else 0
    return run_id, project


def _ingest_handler(kind: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        state = request.app[STATE]
        state.requests[kind] += 1
        headers = _ingest_auth(request) or _ingest_headers(request)
        if isinstance(headers, web.Response):
            state.requests_rejected[kind] += 1
            await request.release()
            return headers
        run_id, project = headers
        parsed = await parse_ndjson(kind, await request.read())
        await asyncio.sleep(state.config.record_time * parsed.records)
        keep = parsed.error is None or state.config.keep_lines_before_error
        if keep and parsed.rows:
            run = state.ingest_run(run_id, project)
            if kind == "metrics":
                state.add_metrics(run, parsed.rows, time.time())
            elif kind == "logs":
                run.log_lines += len(parsed.rows)
            else:
                run.data_records += len(parsed.rows)
        error = parsed.error
        if error is None:
            state.records_accepted[kind] += parsed.records
            return web.Response(text=f"Stream processed successfully: {parsed.records} records")
        state.requests_rejected[kind] += 1
        if keep:
            state.records_accepted[kind] += parsed.records
        else:
            state.records_discarded[kind] += parsed.records
        where = f"line {parsed.line}" + (f", field `{error.field}`" if error.field else "")
        return _ingest_error(
            400,
            error.code,
            f"Failed to process {kind} stream: {where}: {error}",
            line=parsed.line,
            field=error.field,
            records_kept=parsed.records if keep else 0,
        )

    return handler


def _upload_signature(state: PlutoState, path: str) -> str:
    return hmac.new(state.secret, path.encode(), hashlib.sha256).hexdigest()


async def _presign(request: web.Request) -> web.Response:
    state = request.app[STATE]
    headers = _ingest_auth(request) or _ingest_headers(request)
    if isinstance(headers, web.Response):
        return headers
    raw_id = request.headers["X-Run-Id"]
    if not (_U64.match(raw_id) and int(raw_id) <= U64_MAX):  # the original unwraps this parse
        return _ingest_error(500, "INTERNAL_ERROR", f"X-Run-Id is not a u64: {raw_id!r}")
    run_id, project = headers
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return web.Response(status=400, text="Failed to parse the request body as JSON")
    files = body.get("files") if isinstance(body, dict) else None
    problem = None if isinstance(files, list) else "missing field `files`"
    for i, f in enumerate(files or []):
        if problem is not None:
            break
        if not isinstance(f, dict):
            problem = f"files[{i}]: expected an object"
            continue
        for name, ok in (
            ("fileName", isinstance(f.get("fileName"), str)),
            ("logName", isinstance(f.get("logName"), str)),
            ("fileType", isinstance(f.get("fileType"), str | dict)),
            ("fileSize", type(f.get("fileSize")) is int and f["fileSize"] >= 0),
            ("step", type(f.get("step")) is int and f["step"] >= 0),
            ("time", type(f.get("time")) is int and f["time"] >= 0),
        ):
            if not ok:
                problem = f"files[{i}].{name}: missing or of the wrong type"
                break
    if problem is not None:
        return web.Response(status=422, text=f"Failed to deserialize the JSON body: {problem}")
    assert isinstance(files, list)
    run = state.ingest_run(run_id, project)
    origin = _origin(request)
    reply: dict[str, list[dict[str, str]]] = {}
    expires = int(time.time())
    for f in files:
        path = "/_uploads/" + "/".join(
            urllib.parse.quote(part, safe="")
            for part in (state.config.organization, project, str(run_id), f["logName"], f["fileName"])
        )
        query = urllib.parse.urlencode(
            {
                "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                "X-Amz-Date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(expires)),
                "X-Amz-Expires": "3600",
                "X-Amz-SignedHeaders": "host",
                "X-Amz-Signature": _upload_signature(state, path),
            }
        )
        reply.setdefault(f["logName"], []).append({f["fileName"]: f"{origin}{path}?{query}"})
    run.files_presigned += len(files)
    state.counters["files_presigned"] += len(files)
    return web.json_response(reply)


async def _upload(request: web.Request) -> web.Response:
    """Object storage: a `PUT` to a URL from `/files` with its signature is stored (counted, then dropped)."""
    state = request.app[STATE]
    path = request.raw_path.split("?", 1)[0]
    signature = request.query.get("X-Amz-Signature", "")
    if not hmac.compare_digest(signature, _upload_signature(state, path)):
        state.counters["bad_signatures"] += 1
        return web.Response(
            status=403,
            content_type="application/xml",
            text="<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated "
            "does not match the signature you provided.</Message></Error>",
        )
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
    parts = [urllib.parse.unquote(p) for p in path.split("/")[2:]]
    run = state.runs.get(int(parts[2])) if len(parts) >= 3 and parts[2].isdigit() else None
    if run is not None:
        run.files_uploaded += 1
        run.upload_bytes += size
    state.counters["files_uploaded"] += 1
    state.counters["upload_bytes"] += size
    return web.Response(headers={"ETag": f'"{hashlib.md5(path.encode()).hexdigest()}"'})


# --- health, version and the `_` routes -----------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def _ready(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


async def _dlq(request: web.Request) -> web.Response:
    return web.json_response({"batches_pending": 0, "records_pending": 0, "disk_usage_mb": 0})


async def _version(request: web.Request) -> web.Response:
    from harness import __version__

    return web.json_response(
        {
            "service": "ingest",
            "version": f"harness-{__version__}",
            "gitCommit": "unknown",
            "gitBranch": "unknown",
            "buildTime": "unknown",
        }
    )


async def _stats(request: web.Request) -> web.Response:
    return web.json_response({**request.app[SERVICE_MODEL].stats(), "pluto": request.app[STATE].stats()})


async def _list_runs(request: web.Request) -> web.Response:
    return web.json_response({"runs": [run.summary() for run in request.app[STATE].runs.values()]})


def _run_from_path(request: web.Request) -> Run:
    raw = request.match_info["run_id"]
    run = request.app[STATE].runs.get(int(raw)) if raw.isdigit() else None
    if run is None:
        raise Invalid(404, {"error": f"no run {raw}"})
    return run


async def _run_detail(request: web.Request) -> web.Response:
    return web.json_response(_run_from_path(request).detail())


async def _run_points(request: web.Request) -> web.Response:
    run = _run_from_path(request)
    with_time = request.query.get("with_time", "") in ("1", "true")
    points = request.app[STATE].points(run, request.query.getall("key", []), with_time)
    return web.json_response({"run_id": run.id, "points": points})


# --- the app --------------------------------------------------------------------------------------


def _service(model: ServiceModel) -> Middleware:
    """The service model in front of every route but health, version, `/_stats`, `/_runs…` and uploads."""
    modelled = service_middleware(model, exempt_paths=())

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _OPEN_PATHS or request.path.startswith(_OPEN_PREFIXES):
            return await handler(request)
        return await modelled(request, handler)

    return middleware


def build_app(config: PlutoConfig) -> web.Application:
    """The pluto app, with `config`'s service model in front of the API, ingest and heartbeat routes."""
    app = web.Application(client_max_size=MAX_BODY)
    model = ServiceModel(config, seed=config.seed)
    app[SERVICE_MODEL] = model
    app[STATE] = PlutoState(config)
    app.middlewares.append(_service(model))
    router = app.router
    router.add_get("/health", _health)
    router.add_get("/health/ready", _ready)
    router.add_get("/health/dlq", _dlq)
    router.add_get("/version", _version)
    router.add_get("/_stats", _stats)
    router.add_get("/_runs", _list_runs)
    router.add_get("/_runs/{run_id}", _refusals(_run_detail))
    router.add_get("/_runs/{run_id}/points", _refusals(_run_points))
    router.add_post("/api/slug", _refusals(_slug))
    router.add_get("/api/slug", _refusals(_slug))
    api: dict[str, Handler] = {
        "create": _create_run,
        "resume": _resume_run,
        "status/update": _update_status,
        "logName/add": _add_log_names,
        "tags/update": _update_tags,
        "config/update": _update_config,
        "modelGraph/create": _model_graph,
        "trigger": _trigger,
        "alert": _alert,
    }
    for path, handler in api.items():
        router.add_post(f"/api/runs/{path}", _refusals(handler))
    for kind in KINDS:
        router.add_post(f"/ingest/{kind}", _ingest_handler(kind))
    router.add_post("/files", _presign)
    router.add_put("/_uploads/{tail:.+}", _upload)
    return app
