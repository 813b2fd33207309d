"""The store (SQLModel): SQLite with WAL by default, or PostgreSQL by URL for a team's shared runs.
The collector is its only writer during a run.

Tables: `run`, `worker`, `window` (one row per second × group × name, with encoded histograms),
`error` (deduplicated: message, count, first/last seen), `event` (the run's timeline), `datapoint`
(free-form per-entity records), `metric` (counters and gauges per second), `health` (the harness's own
CPU, loop lag and dropped iterations per worker per second), `log` (warnings and errors) and
`baseline` (the run each profile's comparisons default to).

`--db` / `$HARNESS_DB` is a file path (SQLite) or a SQLAlchemy URL: `postgresql://user:pass@host/db` or
`postgresql+psycopg://…` (the `store-postgres` extra) or `sqlite:///path`. Raw SQL in harness is written
to run on both; where the dialects differ (JSON, upsert functions, index hints) it asks the Store.
A URL's password is a secret: `Store.display` and `redact_db` give the URL without it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlmodel import Field, SQLModel, create_engine, select

from harness.errors import UsageError

SCHEMA_VERSION = 1

_BIG = BigInteger().with_variant(Integer(), "sqlite")
"""64-bit on PostgreSQL (INTEGER is 32-bit there); the same INTEGER as ever on SQLite."""


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
    bytes_sent: int = Field(default=0, sa_column=Column(_BIG, nullable=False, default=0))
    bytes_received: int = Field(default=0, sa_column=Column(_BIG, nullable=False, default=0))
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
    rss_bytes: int = Field(default=0, sa_column=Column(_BIG, nullable=False, default=0))
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


DEFAULT_DATA_DIR = Path("harness-data")

REMOTE_SILENCE_S = 600.0
"""On a shared (server) database, a running run of another host is taken as aborted only after this long
without a stored second: its controller's pid cannot be checked from here."""

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_db_url(db: str | Path) -> bool:
    """True for a SQLAlchemy URL (`postgresql://…`, `sqlite:///…`), False for a file path."""
    return isinstance(db, str) and bool(_URL_RE.match(db))


def default_db_path() -> str | Path:
    """`$HARNESS_DB` (a path or a database URL), else ./harness-data/harness.db."""
    value = os.environ.get("HARNESS_DB")
    if value and is_db_url(value):
        return value
    return Path(value or DEFAULT_DATA_DIR / "harness.db")


def db_arg(value: str | Path) -> str | Path:
    """A `--db` value as Store takes it: a URL stays a string, anything else is a Path."""
    return value if is_db_url(value) else Path(value)


def data_dir_of(db: str | Path) -> Path:
    """Where run folders go by default: beside a SQLite file, else ./harness-data."""
    if not is_db_url(db):
        return Path(db).parent
    if str(db).startswith("sqlite"):
        return Path(make_url(str(db)).database or "harness.db").parent
    return DEFAULT_DATA_DIR


def redact_db(db: str | Path) -> str:
    """A path as it is; a URL with its password replaced by `***` (for logs, errors and reports)."""
    if not is_db_url(db):
        return str(db)
    try:
        return make_url(str(db)).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", str(db))


def db_exists(db: str | Path) -> bool:
    """Whether a SQLite file is there (a server database is taken to exist: connecting tells)."""
    if not is_db_url(db):
        return Path(db).is_file()
    url = str(db)
    if url.startswith("sqlite"):
        database = make_url(url).database
        return not database or database == ":memory:" or Path(database).is_file()
    return True


def _engine_url(db: str) -> Any:
    """The SQLAlchemy URL of `db`, with `postgresql://` meaning psycopg 3; UsageError in one line."""
    try:
        url = make_url(db)
    except ArgumentError:
        raise UsageError(f"--db: not a database URL: {redact_db(db)}") from None
    backend = url.get_backend_name()
    if backend == "postgresql":
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        if url.get_driver_name() == "psycopg":
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise UsageError(
                    "--db: a postgresql URL needs the Python package 'psycopg': "
                    "pip install 'harness[store-postgres]'"
                ) from None
    elif backend != "sqlite":
        raise UsageError(
            f"--db: unsupported database {backend!r} (use a file path, sqlite:// or postgresql://)"
        )
    return url


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
        self.url: str | None = None
        """The database URL when one was given (holds the password: never print it; see `display`)."""
        if is_db_url(path):
            url = _engine_url(str(path))
            self.url = str(path)
            if url.get_backend_name() == "sqlite":
                path = Path(url.database or "harness.db")
        if self.url is None or isinstance(path, Path):
            self.path = Path(path)
            """The SQLite file; for a server database, a place for the reports (./harness-data/harness.db)."""
            self.dialect = "sqlite"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                f"sqlite:///{self.path}", connect_args={"check_same_thread": False, "timeout": 10}
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.path = DEFAULT_DATA_DIR / "harness.db"
            self.dialect = "postgresql"
            self.engine = create_engine(
                url, pool_size=5, max_overflow=10, pool_pre_ping=True, pool_recycle=1800, hide_parameters=True
            )
        if self.dialect == "sqlite":
            self._create_schema()
            return
        try:
            self._create_schema()
        except DBAPIError as exc:
            self.engine.dispose()
            raise UsageError(f"--db: cannot use {self.display}: {self._scrub(exc.orig)}") from None

    def _create_schema(self) -> None:
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                # processes starting together on a new database (a team's panels, controllers) would
                # race in CREATE TABLE IF NOT EXISTS ("duplicate key ... pg_type"): one at a time
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('harness-store:schema'))"))
            SQLModel.metadata.create_all(conn)
            # indexes added after a database was created (create_all makes only missing tables)
            conn.execute(text("CREATE INDEX IF NOT EXISTS ix_datapoint_run_t ON datapoint (run_id, t)"))
            if self.dialect == "sqlite":
                conn.execute(text(f"PRAGMA user_version={SCHEMA_VERSION}"))
            # PostgreSQL: no user_version; the schema is the models' (create_all), as on SQLite

    def _scrub(self, error: BaseException | None) -> str:
        """The first line of a driver error, with the URL's password (should it appear) masked."""
        lines = str(error or "").strip().splitlines()
        message = lines[0] if lines else type(error).__name__
        password = make_url(self.url).password if self.url else None
        return message.replace(str(password), "***") if password else message

    @property
    def display(self) -> str:
        """Where the data is, fit to print: the file path, or the URL without its password."""
        return redact_db(self.url) if self.url is not None else str(self.path)

    @property
    def data_dir(self) -> Path:
        """Where run folders (reports) go by default: beside the SQLite file, else ./harness-data."""
        return self.path.parent

    # -- dialect-specific SQL fragments ----------------------------------------------------
    def json_value(self, column: str, key: str) -> str:
        """SQL for the value of top-level `key` of a JSON text column (NULL when absent or null)."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"not a plain JSON key: {key!r}")
        if self.dialect == "postgresql":
            return f"(CAST({column} AS jsonb) ->> '{key}')"
        return f"json_extract({column}, '$.{key}')"

    def json_number(self, column: str, key: str) -> str:
        """SQL for the number at top-level `key` of a JSON text column (NULL when absent or null)."""
        if self.dialect == "postgresql":
            return f"CAST({self.json_value(column, key)} AS double precision)"
        return f"CAST({self.json_value(column, key)} AS REAL)"

    def ids_in(self, param: str) -> str:
        """SQL for the ids in the JSON array bound to `:param` (any number, no bound-variable limit)."""
        if self.dialect == "postgresql":
            return f"SELECT CAST(value AS bigint) FROM jsonb_array_elements_text(CAST(:{param} AS jsonb))"
        return f"SELECT value FROM json_each(:{param})"

    @property
    def not_indexed(self) -> str:
        """SQLite's `NOT INDEXED` table hint (nothing elsewhere)."""
        return " NOT INDEXED" if self.dialect == "sqlite" else ""

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
            if self.dialect != "sqlite" and run.host and run.host != host and not self._silent(run):
                continue  # a shared database: another machine's controller, heard from recently
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
                reason="controller died (found by a later start or panel)",
            )
            self.add_events(
                run.id, [{"t": time.time(), "type": "recovered_aborted", "detail": {"last_data": ended}}]
            )
            recovered.append(run.id)
        return recovered

    def _silent(self, run: Run) -> bool:
        """Whether a run has written nothing (health rows come every second) for REMOTE_SILENCE_S."""
        with self.engine.connect() as conn:
            last = conn.execute(text("SELECT MAX(t) FROM health WHERE run_id=:r"), {"r": run.id}).scalar()
        newest = max(float(last or 0.0), self.last_activity(run.id) or 0.0, run.started_at)
        return time.time() - newest > REMOTE_SILENCE_S

    def last_activity(self, run_id: str) -> float | None:
        """The time of the last stored second or event of a run."""
        with self.engine.connect() as conn:
            t_window = conn.execute(
                text('SELECT MAX(t) FROM "window" WHERE run_id=:r'), {"r": run_id}
            ).scalar()
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
        greatest, least = ("GREATEST", "LEAST") if self.dialect == "postgresql" else ("MAX", "MIN")
        if self.dialect == "postgresql":  # its text cannot hold NUL characters: one would fail the second
            windows, errors, metrics, health, logs = map(_no_nul, (windows, errors, metrics, health, logs))
            datapoints = [
                {**d, "group": _no_nul_text(d["group"]), "entity": _no_nul_text(d["entity"])}
                for d in datapoints
            ]
        dumps = finite_json if self.dialect == "postgresql" else json.dumps
        with self.transaction() as conn:
            if windows:
                conn.execute(Window.__table__.insert(), [{"run_id": run_id, **w} for w in windows])  # type: ignore[attr-defined]
            for err in errors:
                conn.execute(
                    text(
                        'INSERT INTO error (run_id, "group", name, message, count, first_seen, last_seen) '
                        "VALUES (:run_id, :group, :name, :message, :count, :t, :t) "
                        'ON CONFLICT (run_id, "group", name, message) DO UPDATE SET '
                        f"count = error.count + excluded.count, "
                        f"last_seen = {greatest}(error.last_seen, excluded.last_seen), "
                        f"first_seen = {least}(error.first_seen, excluded.first_seen)"
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
                            "values_json": dumps(d["values"], default=str),
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
            'FROM "window" WHERE run_id=:r'
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


def finite_json(value: Any, **kwargs: Any) -> str:
    """`json.dumps`, with NaN and ±Infinity written as null: PostgreSQL's jsonb (which the panel's JSON
    queries cast to there) refuses them, where SQLite's JSON5 reads them."""
    out = json.dumps(value, **kwargs)
    if "NaN" in out or "Infinity" in out:
        out = json.dumps(json.loads(out, parse_constant=lambda _name: None), **kwargs)
    return out


def _no_nul_text(value: Any) -> Any:
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _no_nul(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with NUL characters in their strings replaced (PostgreSQL's text refuses them)."""
    return [{k: _no_nul_text(v) for k, v in row.items()} for row in rows]


def _same_controller(run: Run) -> bool:
    """True if the run's recorded pid is still the process that started it (pids get reused).

    That process may be the CLI, `harness serve` or a gunicorn worker, so only its start time is checked.
    """
    try:
        proc = psutil.Process(run.controller_pid)
        return proc.create_time() <= run.started_at + 1
    except (psutil.Error, OSError):
        return False
