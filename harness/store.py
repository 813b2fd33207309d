"""The SQLite store (SQLModel, WAL). The collector is its only writer during a run.

Tables: `run`, `worker`, `window` (one row per second × group × name, with encoded histograms),
`error` (deduplicated: message, count, first/last seen), `event` (the run's timeline), `datapoint`
(free-form per-entity records), `metric` (counters and gauges per second), `health` (the harness's own
CPU, loop lag and dropped iterations per worker per second), `log` (warnings and errors) and
`baseline` (the run each profile's comparisons default to).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Column, Index, LargeBinary, event, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Field, SQLModel, create_engine, select

SCHEMA_VERSION = 1


class Run(SQLModel, table=True):
    """One run of a profile."""

    id: str = Field(primary_key=True)
    profile: str
    source: str = ""
    description: str = ""
    status: str = "running"
    """running | passed | failed | aborted"""
    started_at: float
    ended_at: float | None = None
    duration_s: float = 0.0
    """The planned duration."""
    exit_code: int | None = None
    controller_pid: int = 0
    host: str = ""
    profile_json: str = "{}"
    """The profile as written (secrets stay as `${VAR}` placeholders)."""
    summary_json: str | None = None
    reason: str = ""


class Worker(SQLModel, table=True):
    """One worker process (a restart is a new row)."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    group: str
    index: int
    pid: int | None = None
    started_at: float
    ended_at: float | None = None
    exit_code: int | None = None
    restarts: int = 0


class Window(SQLModel, table=True):
    """One second of one (group, name): counts and the latency histogram."""

    __table_args__ = (Index("ix_window_run_t", "run_id", "t"),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: str
    t: int
    group: str
    name: str
    kind: str = "request"
    count: int = 0
    failures: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    hist: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    hist_intended: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class Error(SQLModel, table=True):
    """A distinct error message of one (group, name), with how often and when it happened."""

    __table_args__ = (Index("ix_error_key", "run_id", "group", "name", "message", unique=True),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: str
    group: str
    name: str
    message: str
    count: int = 0
    first_seen: float
    last_seen: float


class Event(SQLModel, table=True):
    """A moment on the run's timeline: started, scaled, worker exited, restarted, stopped, …"""

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    t: float
    type: str
    group: str | None = None
    detail: str = "{}"


class DataPoint(SQLModel, table=True):
    """A free-form record about one entity (e.g. one WebRTC peer's stats)."""

    __table_args__ = (Index("ix_datapoint_run_t", "run_id", "t"),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    t: float
    group: str
    entity: str
    values_json: str = "{}"


class Metric(SQLModel, table=True):
    """A counter total or last gauge value of one second."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    t: int
    group: str
    name: str
    type: str
    value: float


class Health(SQLModel, table=True):
    """The harness's own health, per worker per second."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    t: float
    group: str
    worker: int
    users: int = 0
    target: float = 0.0
    in_flight: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    loop_lag_max_ms: float = 0.0
    loop_lag_mean_ms: float = 0.0
    schedule_lag_max_ms: float = 0.0
    dropped: int = 0
    iterations: int = 0
    iterations_failed: int = 0


class Log(SQLModel, table=True):
    """A warning or error logged during a run, by the controller or a worker."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    t: float
    level: str
    source: str
    message: str


class Baseline(SQLModel, table=True):
    """The run that `harness compare` uses as the baseline of a profile (one per profile)."""

    profile: str = Field(primary_key=True)
    run_id: str
    marked_at: float


def default_db_path() -> Path:
    """`$HARNESS_DB`, else ./harness-data/harness.db."""
    return Path(os.environ.get("HARNESS_DB") or Path("harness-data") / "harness.db")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Store:
    """Opens the database and offers the writes and queries the rest of harness needs."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(
            f"sqlite:///{self.path}", connect_args={"check_same_thread": False, "timeout": 10}
        )
        event.listen(self.engine, "connect", _sqlite_pragmas)
        SQLModel.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            # indexes added after a database was created (create_all makes only missing tables)
            conn.execute(text("CREATE INDEX IF NOT EXISTS ix_datapoint_run_t ON datapoint (run_id, t)"))
            conn.execute(text(f"PRAGMA user_version={SCHEMA_VERSION}"))

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction."""
        with self.engine.begin() as conn:
            yield conn

    # -- runs ------------------------------------------------------------------------------
    def create_run(self, run: Run) -> None:
        """Insert a new run."""
        with self.transaction() as conn:
            conn.execute(Run.__table__.insert().values(**run.model_dump()))  # type: ignore[attr-defined]

    def update_run(self, run_id: str, **values: Any) -> None:
        """Set fields of a run."""
        with self.transaction() as conn:
            conn.execute(Run.__table__.update().where(Run.__table__.c.id == run_id).values(**values))  # type: ignore[attr-defined]

    def get_run(self, run_id: str) -> Run | None:
        """A run by id, or by a unique prefix of its id."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Run).where(Run.id.startswith(run_id))  # type: ignore[attr-defined,unused-ignore]
            ).all()
        if len(rows) != 1:
            exact = [r for r in rows if r.id == run_id]
            if not exact:
                return None
            rows = exact
        return Run.model_validate(rows[0]._mapping)

    def list_runs(self, limit: int = 50) -> list[Run]:
        """The newest runs first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(Run).order_by(Run.started_at.desc()).limit(limit)).all()  # type: ignore[attr-defined]
        return [Run.model_validate(r._mapping) for r in rows]

    def recover_aborted(self) -> list[str]:
        """Mark as aborted every `running` run whose controller is gone (killed, crashed, rebooted)."""
        host = socket.gethostname()
        recovered = []
        for run in self.list_runs(limit=1000):
            if run.status != "running":
                continue
            alive = (
                run.host == host
                and psutil.pid_exists(run.controller_pid)
                and run.controller_pid != os.getpid()
            )
            if alive and _same_controller(run):
                continue
            ended = self.last_activity(run.id) or run.started_at
            self.update_run(
                run.id,
                status="aborted",
                ended_at=ended,
                exit_code=3,
                reason="controller died; recovered on next start",
            )
            self.add_events(
                run.id, [{"t": time.time(), "type": "recovered_aborted", "detail": {"last_data": ended}}]
            )
            recovered.append(run.id)
        return recovered

    def last_activity(self, run_id: str) -> float | None:
        """The time of the last stored second or event of a run."""
        with self.engine.connect() as conn:
            t_window = conn.execute(text("SELECT MAX(t) FROM window WHERE run_id=:r"), {"r": run_id}).scalar()
            t_event = conn.execute(text("SELECT MAX(t) FROM event WHERE run_id=:r"), {"r": run_id}).scalar()
        values = [float(v) + (1.0 if v is t_window else 0.0) for v in (t_window, t_event) if v is not None]
        return max(values) if values else None

    # -- baselines -------------------------------------------------------------------------
    def set_baseline(self, profile: str, run_id: str) -> None:
        """Make `run_id` the baseline of `profile` (replacing any earlier one)."""
        with self.transaction() as conn:
            conn.execute(
                text(
                    "INSERT INTO baseline (profile, run_id, marked_at) VALUES (:p, :r, :t) "
                    "ON CONFLICT (profile) DO UPDATE SET run_id = excluded.run_id, "
                    "marked_at = excluded.marked_at"
                ),
                {"p": profile, "r": run_id, "t": time.time()},
            )

    def get_baseline(self, profile: str) -> str | None:
        """The run id marked as the baseline of `profile`, if any."""
        rows = self.rows("SELECT run_id FROM baseline WHERE profile=:p", p=profile)
        return str(rows[0]["run_id"]) if rows else None

    def baselines(self) -> dict[str, str]:
        """Every marked baseline: profile → run id."""
        return {r["profile"]: r["run_id"] for r in self.rows("SELECT profile, run_id FROM baseline")}

    # -- writes (the collector) ------------------------------------------------------------
    def write_second(
        self,
        run_id: str,
        windows: list[dict[str, Any]],
        errors: list[dict[str, Any]],
        metrics: list[dict[str, Any]],
        datapoints: list[dict[str, Any]],
        health: list[dict[str, Any]],
        events: list[dict[str, Any]],
        logs: list[dict[str, Any]],
    ) -> None:
        """Write one second of everything in one transaction."""
        with self.transaction() as conn:
            if windows:
                conn.execute(Window.__table__.insert(), [{"run_id": run_id, **w} for w in windows])  # type: ignore[attr-defined]
            for err in errors:
                conn.execute(
                    text(
                        'INSERT INTO error (run_id, "group", name, message, count, first_seen, last_seen) '
                        "VALUES (:run_id, :group, :name, :message, :count, :t, :t) "
                        'ON CONFLICT (run_id, "group", name, message) DO UPDATE SET '
                        "count = count + excluded.count, last_seen = MAX(last_seen, excluded.last_seen), "
                        "first_seen = MIN(first_seen, excluded.first_seen)"
                    ),
                    {"run_id": run_id, **err},
                )
            if metrics:
                conn.execute(Metric.__table__.insert(), [{"run_id": run_id, **m} for m in metrics])  # type: ignore[attr-defined]
            if datapoints:
                conn.execute(
                    DataPoint.__table__.insert(),  # type: ignore[attr-defined]
                    [
                        {
                            "run_id": run_id,
                            "t": d["t"],
                            "group": d["group"],
                            "entity": str(d["entity"]),
                            "values_json": json.dumps(d["values"], default=str),
                        }
                        for d in datapoints
                    ],
                )
            if health:
                conn.execute(Health.__table__.insert(), [{"run_id": run_id, **h} for h in health])  # type: ignore[attr-defined]
            if events:
                self._insert_events(conn, run_id, events)
            if logs:
                conn.execute(Log.__table__.insert(), [{"run_id": run_id, **entry} for entry in logs])  # type: ignore[attr-defined]

    def add_events(self, run_id: str, events: list[dict[str, Any]]) -> None:
        """Append events outside the collector's per-second transaction."""
        with self.transaction() as conn:
            self._insert_events(conn, run_id, events)

    @staticmethod
    def _insert_events(conn: Connection, run_id: str, events: Iterable[dict[str, Any]]) -> None:
        conn.execute(
            Event.__table__.insert(),  # type: ignore[attr-defined]
            [
                {
                    "run_id": run_id,
                    "t": e["t"],
                    "type": e["type"],
                    "group": e.get("group"),
                    "detail": json.dumps(e.get("detail") or {}, default=str),
                }
                for e in events
            ],
        )

    def add_worker(self, run_id: str, group: str, index: int, pid: int | None, restarts: int) -> int:
        """Insert a worker row; returns its id."""
        with self.transaction() as conn:
            result = conn.execute(
                Worker.__table__.insert().values(  # type: ignore[attr-defined]
                    run_id=run_id,
                    group=group,
                    index=index,
                    pid=pid,
                    started_at=time.time(),
                    restarts=restarts,
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    def end_worker(self, worker_id: int, exit_code: int | None) -> None:
        """Record a worker's exit."""
        with self.transaction() as conn:
            conn.execute(
                Worker.__table__.update()  # type: ignore[attr-defined]
                .where(Worker.__table__.c.id == worker_id)  # type: ignore[attr-defined]
                .values(ended_at=time.time(), exit_code=exit_code)
            )

    # -- reads -----------------------------------------------------------------------------
    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Rows of a read-only SQL query as dicts."""
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]

    def windows(
        self, run_id: str, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """Every stored window of a run (optionally within [since, until))."""
        sql = (
            'SELECT t, "group", name, kind, count, failures, bytes_sent, bytes_received, hist, hist_intended '
            "FROM window WHERE run_id=:r"
        )
        params: dict[str, Any] = {"r": run_id}
        if since is not None:
            sql += " AND t >= :since"
            params["since"] = since
        if until is not None:
            sql += " AND t < :until"
            params["until"] = until
        return self.rows(sql + " ORDER BY t", **params)

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """The run's timeline."""
        rows = self.rows(
            'SELECT t, type, "group", detail FROM event WHERE run_id=:r ORDER BY t, id', r=run_id
        )
        for row in rows:
            row["detail"] = json.loads(row["detail"] or "{}")
        return rows

    def errors(self, run_id: str) -> list[dict[str, Any]]:
        """Distinct errors, most frequent first."""
        return self.rows(
            'SELECT "group", name, message, count, first_seen, last_seen FROM error WHERE run_id=:r '
            "ORDER BY count DESC",
            r=run_id,
        )

    def health_summary(self, run_id: str) -> dict[str, Any]:
        """The harness's own health over the run: worst CPU and loop lag, dropped iterations."""
        row = self.rows(
            "SELECT MAX(cpu_percent) AS cpu_max, AVG(cpu_percent) AS cpu_mean, "
            "MAX(loop_lag_max_ms) AS loop_lag_max_ms, AVG(loop_lag_mean_ms) AS loop_lag_mean_ms, "
            "MAX(schedule_lag_max_ms) AS schedule_lag_max_ms, COALESCE(SUM(dropped), 0) AS dropped, "
            "MAX(rss_bytes) AS rss_max_bytes FROM health WHERE run_id=:r",
            r=run_id,
        )[0]
        return {k: (v if v is not None else 0) for k, v in row.items()}


def _same_controller(run: Run) -> bool:
    """True if the run's recorded pid is still the process that started it (pids get reused).

    That process may be the CLI, `harness serve` or a gunicorn worker, so only its start time is checked.
    """
    try:
        proc = psutil.Process(run.controller_pid)
        return proc.create_time() <= run.started_at + 1
    except (psutil.Error, OSError):
        return False
