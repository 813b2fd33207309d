"""The `results` target: the Catalyst peer performance test's results server (seed-systems.md §3.1).

`add_results_routes(app, backend)` adds the original express server's API to an aiohttp app, with its
status codes and bodies:

- `GET /status` → `{"status": "ok"}`
- `POST /test` → a new test `{Date.now()}-{6 random [A-Za-z0-9]}`; body `{"started"?: bool}` starts it at
  once. Answers `{"id", "started"}`. `POST /test/{testId}` does the same with a given id (and, as in the
  original, silently replaces a test of that id).
- `PUT /test/{testId}/start` → `{"id", "started"}`.
- `GET /test/{testId}` → `{"id", "started", "finished"}`; with `?dataPoints=true` the whole test:
  `{"id", "dataPoints": [{"peerId", "timestamp", "metrics"}], "started", "finished",
  "topologyDataPoints": [{"timestamp", "topology"}], "results": {peerId: {...body, "timestamp"}}}`.
- `PUT /test/{testId}/peer/{peerId}/metrics` → appends and echoes `{"peerId", "timestamp", "metrics"}`
  (and pushes the point to InfluxDB when configured, fire-and-forget).
- `PUT /test/{testId}/peer/{peerId}/results` → `{...body, "timestamp"}`.
- `PUT /test/{testId}/topology` → `{"id", "started"}`.
- `PUT /test/{testId}/finish` → the whole test.

An unknown test is 404 `{"status": "test-not-found"}` on every route that names one. The routes that add
to a test, and `finish`, want it ongoing (started, not finished): otherwise 400 `{"status":
"test-not-started"}` or `{"status": "test-already-finished"}`. Timestamps are epoch milliseconds. A body
that is not JSON (or not an object where one is needed) is 400 `{"status": "bad-request", "message"}`.
Unlike the original (which ignores a body without `Content-Type: application/json`), the body is read as
JSON whatever its content type, so that a page may send `text/plain` and skip the CORS preflight. Where
the original leaves `started` or `finished` out of a JSON answer (undefined), they are `null` here.
Every answer carries `Access-Control-Allow-Origin: *` and preflights are answered, as `cors()` did.

Backends (`ResultsBackend`):

- `StoreBackend`: a test is a run in the harness database (SQLite, or PostgreSQL by URL). A test made
  through this API is a run of profile `results-server` (status `created` until started, `running` while
  ongoing, `passed` when finished); its metrics are data points of the backend's group (entity = peer id),
  its results and topology data points of the groups `results` and `topology`. Any other run (one a
  harness run made) is a test too: started at its `started_at`, finished at its `ended_at`; it takes data
  points while it runs, but the API cannot create, start or finish it (400 `{"status": "test-managed-by-
  harness"}`).
- `RunBackend`: one test in memory, the current harness run of a browser worker, with callbacks.

`influx_lines` and `InfluxWriter` export metrics as the original did: InfluxDB line protocol, POSTed to
`{url}write?db=comms&precision=ms` with `content-type: csv`.

The embedded target (`ResultsConfig`, `build_app`) serves the API over a `StoreBackend`, behind the
service model (`/status` and `/_stats` are exempt).
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import json
import logging
import math
import os
import secrets
import socket
import sqlite3
import string
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import Field, field_validator

from harness.distributions import Distribution
from harness.store import Run, Store, default_db_path, finite_json
from harness.targets.service import ServiceModel, ServiceModelConfig, instrument

logger = logging.getLogger(__name__)

PROFILE = "results-server"
"""The profile of a run created through the results API."""

SOURCE = "results API"
"""The source of a run created through the results API."""

RESULTS_GROUP = "results"
"""The data point group of a test's per-peer results."""

TOPOLOGY_GROUP = "topology"
"""The data point group of a test's topology snapshots (entity `topology`)."""

FAMILIES = ("sent", "received", "relayed", "all", "relevant", "duplicate", "expired")
"""The packet families of a peer's metrics, in the original's order."""

MAX_BODY = 16 * 1024 * 1024
_ID_CHARS = string.ascii_letters + string.digits
_T = TypeVar("_T")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def new_test_id(now_ms: int | None = None) -> str:
    """A test id as the original makes one: `{epoch ms}-{6 random [A-Za-z0-9]}`."""
    stamp = _now_ms() if now_ms is None else now_ms
    return f"{stamp}-{''.join(secrets.choice(_ID_CHARS) for _ in range(6))}"


class ResultsError(Exception):
    """An answer other than 200: the HTTP status and the body's `status` (and maybe a `message`)."""

    def __init__(self, http_status: int, status: str, message: str | None = None) -> None:
        super().__init__(f"{http_status} {status}" + (f": {message}" if message else ""))
        self.http_status = http_status
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        body: dict[str, Any] = {"status": self.status}
        if self.message is not None:
            body["message"] = self.message
        return body


def not_found() -> ResultsError:
    """404 `{"status": "test-not-found"}`."""
    return ResultsError(404, "test-not-found")


def managed() -> ResultsError:
    """400 `{"status": "test-managed-by-harness"}`: the test is a harness run the API may not change."""
    return ResultsError(
        400, "test-managed-by-harness", "this test is a harness run: harness starts and finishes it"
    )


def check_ongoing(started: int | None, finished: int | None) -> None:
    """Raise the original's 400 unless the test is started and not finished."""
    if started and not finished:
        return
    raise ResultsError(400, "test-already-finished" if started else "test-not-started")


def whole_test(
    test_id: str,
    started: int | None,
    finished: int | None,
    data_points: Iterable[dict[str, Any]],
    topology: Iterable[dict[str, Any]],
    results: Mapping[str, Any],
) -> dict[str, Any]:
    """The whole test as `GET /test/{id}?dataPoints=true` and `finish` answer it."""
    return {
        "id": test_id,
        "dataPoints": list(data_points),
        "started": started,
        "finished": finished,
        "topologyDataPoints": list(topology),
        "results": dict(results),
    }


# --- backends -------------------------------------------------------------------------------------


class ResultsBackend(abc.ABC):
    """Where the results API keeps its tests. Methods raise `ResultsError` for non-200 answers."""

    @abc.abstractmethod
    async def create(self, test_id: str | None, started: bool) -> dict[str, Any]:
        """Create (or replace) a test, `test_id` or a new id; `{"id", "started"}`."""

    @abc.abstractmethod
    async def start(self, test_id: str) -> dict[str, Any]:
        """Start a test now; `{"id", "started"}`."""

    @abc.abstractmethod
    async def summary(self, test_id: str) -> dict[str, Any]:
        """`{"id", "started", "finished"}`."""

    @abc.abstractmethod
    async def whole(self, test_id: str) -> dict[str, Any]:
        """The whole test (see `whole_test`)."""

    @abc.abstractmethod
    async def add_metrics(self, test_id: str, peer_id: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append a data point to an ongoing test; `{"peerId", "timestamp", "metrics"}`."""

    @abc.abstractmethod
    async def add_results(self, test_id: str, peer_id: str, results: dict[str, Any]) -> dict[str, Any]:
        """Set a peer's results in an ongoing test; `{...results, "timestamp"}`."""

    @abc.abstractmethod
    async def add_topology(self, test_id: str, topology: Any) -> dict[str, Any]:
        """Append a topology snapshot to an ongoing test; `{"id", "started"}`."""

    @abc.abstractmethod
    async def finish_test(self, test_id: str) -> dict[str, Any]:
        """Finish an ongoing test now; the whole test."""

    async def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        """Release what the backend holds."""


class _Test:
    """A run seen as a test."""

    __slots__ = ("finished", "id", "managed", "started")

    def __init__(self, row: Mapping[str, Any]) -> None:
        self.id: str = row["id"]
        self.managed = row["profile"] != PROFILE
        status = row["status"]
        self.started: int | None = (
            None if (not self.managed and status == "created") else _ms(row["started_at"])
        )
        ended = row["ended_at"]
        self.finished: int | None = None if ended is None else _ms(ended)


def _loads_stored(text: str) -> Any:
    # Stored values may hold NaN (the collector writes with json.dumps): answer null, valid JSON.
    return json.loads(text or "null", parse_constant=lambda _name: None)


class _PgConnection:
    """A psycopg connection seen through the slice of sqlite3's API StoreBackend uses (`?` placeholders)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return bool(self._conn.info.transaction_status != TransactionStatus.IDLE)

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), tuple(params))

    def rows(self, sql: str, params: Iterable[Any]) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        with self._conn.cursor(row_factory=dict_row) as cursor:
            cursor.execute(sql.replace("?", "%s"), tuple(params))
            return list(cursor.fetchall())

    def commit(self) -> None:
        self._conn.commit()

    def rollback(self) -> None:
        self._conn.rollback()


_Connection = Any
"""A sqlite3.Connection, or a `_PgConnection` on a PostgreSQL store."""


class StoreBackend(ResultsBackend):
    """Tests are runs in the harness database (see the module's docstring).

    Every database call runs on one worker thread, in a short transaction of its own; those that write
    take the write lock first (SQLite: `BEGIN IMMEDIATE`, so that a harness collector writing the same
    database makes them wait, the store's busy timeout, rather than fail; PostgreSQL: a transaction-level
    advisory lock, so that two backends serving one database never create or finish a test at once).
    """

    def __init__(
        self,
        db_path: str | Path | None = None,
        group: str = "peers",
        results_dir: str | Path | None = None,
    ) -> None:
        if not group or group in (RESULTS_GROUP, TOPOLOGY_GROUP):
            raise ValueError(f"group must be a name other than {RESULTS_GROUP!r} and {TOPOLOGY_GROUP!r}")
        self.store = Store(db_path if db_path is not None else default_db_path())
        self.group = group
        self.results_dir = Path(results_dir).expanduser() if results_dir is not None else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="results-db")
        self._host = socket.gethostname()

    # -- plumbing

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @contextmanager
    def _connection(self) -> Iterator[_Connection]:
        raw = self.store.engine.raw_connection()
        try:
            if self.store.dialect == "postgresql":
                yield _PgConnection(raw.driver_connection)
            else:
                yield cast(sqlite3.Connection, raw.driver_connection)
        finally:
            raw.close()

    @contextmanager
    def _writing(self) -> Iterator[_Connection]:
        """One short write transaction that holds the write lock from its start."""
        with self._connection() as conn:
            if conn.in_transaction:
                conn.rollback()
            if isinstance(conn, _PgConnection):
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('harness-results-target'))")
            else:
                conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    @staticmethod
    def _rows(conn: _Connection, sql: str, params: Iterable[Any]) -> list[Any]:
        if isinstance(conn, _PgConnection):
            return conn.rows(sql, params)
        cursor = conn.cursor()
        cursor.row_factory = sqlite3.Row  # on the cursor: the pooled connection stays as SQLAlchemy wants it
        try:
            return cursor.execute(sql, tuple(params)).fetchall()
        finally:
            cursor.close()

    @classmethod
    def _find(cls, conn: _Connection, test_id: str) -> _Test | None:
        rows = cls._rows(
            conn, "SELECT id, profile, status, started_at, ended_at FROM run WHERE id = ?", (test_id,)
        )
        row = rows[0] if rows else None
        return None if row is None else _Test(row)

    @staticmethod
    def _insert_point(
        conn: _Connection, test_id: str, t: float, group: str, entity: str, values: Any
    ) -> None:
        conn.execute(
            'INSERT INTO datapoint (run_id, t, "group", entity, values_json) VALUES (?, ?, ?, ?, ?)',
            (
                test_id,
                t,
                group,
                entity,
                finite_json(values) if isinstance(conn, _PgConnection) else json.dumps(values),
            ),
        )

    def _ongoing(self, conn: _Connection, test_id: str) -> _Test:
        test = self._find(conn, test_id)
        if test is None:
            raise not_found()
        check_ongoing(test.started, test.finished)
        return test

    # -- sync implementations (on the database thread)

    def _create(self, test_id: str | None, started: bool) -> dict[str, Any]:
        now_ms = _now_ms()
        test_id = test_id or new_test_id(now_ms)
        values: dict[str, Any] = {
            "profile": PROFILE,
            "source": SOURCE,
            "description": "a test of the peer performance test results API",
            "status": "running" if started else "created",
            "started_at": now_ms / 1000,
            "ended_at": None,
            "controller_pid": os.getpid(),
            "host": self._host,
            "reason": "",
            "summary_json": None,
        }
        with self._writing() as conn:
            test = self._find(conn, test_id)
            if test is not None and test.managed:
                raise managed()
            if test is None:
                row = Run(id=test_id, **values).model_dump()
                columns = ", ".join(f'"{c}"' for c in row)
                conn.execute(
                    f"INSERT INTO run ({columns}) VALUES ({', '.join('?' * len(row))})", list(row.values())
                )
            else:  # the original replaces the test silently: so do we, with its data points
                conn.execute("DELETE FROM datapoint WHERE run_id = ?", (test_id,))
                assignments = ", ".join(f'"{c}" = ?' for c in values)
                conn.execute(f"UPDATE run SET {assignments} WHERE id = ?", [*values.values(), test_id])
        return {"id": test_id, "started": now_ms if started else None}

    def _start(self, test_id: str) -> dict[str, Any]:
        now_ms = _now_ms()
        with self._writing() as conn:
            test = self._find(conn, test_id)
            if test is None:
                raise not_found()
            if test.managed:
                raise managed()
            # As the original: a finished test started again stays finished.
            status = "running" if test.finished is None else None
            conn.execute(
                "UPDATE run SET started_at = ?, status = COALESCE(?, status) WHERE id = ?",
                (now_ms / 1000, status, test_id),
            )
        return {"id": test_id, "started": now_ms}

    def _summary(self, test_id: str) -> dict[str, Any]:
        with self._connection() as conn:
            test = self._find(conn, test_id)
        if test is None:
            raise not_found()
        return {"id": test.id, "started": test.started, "finished": test.finished}

    def _whole(self, test_id: str) -> dict[str, Any]:
        with self._connection() as conn:
            test = self._find(conn, test_id)
            if test is None:
                raise not_found()
            rows = self._rows(
                conn,
                'SELECT "group", entity, t, values_json FROM datapoint '
                'WHERE run_id = ? AND "group" IN (?, ?, ?) ORDER BY t, id',
                (test_id, self.group, RESULTS_GROUP, TOPOLOGY_GROUP),
            )
        points: list[dict[str, Any]] = []
        topology: list[dict[str, Any]] = []
        results: dict[str, Any] = {}
        for row in rows:
            values = _loads_stored(row["values_json"])
            if row["group"] == self.group:
                points.append({"peerId": row["entity"], "timestamp": _ms(row["t"]), "metrics": values})
            elif row["group"] == RESULTS_GROUP:
                results[row["entity"]] = values
            else:
                topology.append({"timestamp": _ms(row["t"]), "topology": values})
        return whole_test(test.id, test.started, test.finished, points, topology, results)

    def _add(self, test_id: str, group: str, entity: str, values: Any) -> tuple[_Test, int]:
        now_ms = _now_ms()
        with self._writing() as conn:
            test = self._ongoing(conn, test_id)
            self._insert_point(conn, test_id, now_ms / 1000, group, entity, values)
        return test, now_ms

    def _add_metrics(self, test_id: str, peer_id: str, metrics: dict[str, Any]) -> dict[str, Any]:
        _, now_ms = self._add(test_id, self.group, peer_id, metrics)
        return {"peerId": peer_id, "timestamp": now_ms, "metrics": metrics}

    def _add_results(self, test_id: str, peer_id: str, results: dict[str, Any]) -> dict[str, Any]:
        now_ms = _now_ms()
        entry = {**results, "timestamp": now_ms}
        with self._writing() as conn:
            self._ongoing(conn, test_id)
            self._insert_point(conn, test_id, now_ms / 1000, RESULTS_GROUP, peer_id, entry)
        return entry

    def _add_topology(self, test_id: str, topology: Any) -> dict[str, Any]:
        test, _ = self._add(test_id, TOPOLOGY_GROUP, TOPOLOGY_GROUP, topology)
        return {"id": test.id, "started": test.started}

    def _finish(self, test_id: str) -> dict[str, Any]:
        now_ms = _now_ms()
        with self._writing() as conn:
            test = self._find(conn, test_id)
            if test is None:
                raise not_found()
            if test.managed:
                raise managed()
            check_ongoing(test.started, test.finished)
            conn.execute(
                "UPDATE run SET status = 'passed', ended_at = ?, exit_code = 0 WHERE id = ?",
                (now_ms / 1000, test_id),
            )
        whole = self._whole(test_id)
        self._persist(whole)
        return whole

    def _persist(self, whole: dict[str, Any]) -> None:
        """Write `<results_dir>/<id>.json` as the original did on finish (when a directory is set)."""
        if self.results_dir is None:
            return
        name = f"{whole['id']}.json"
        if Path(name).name != name or "/" in name or "\\" in name or name.startswith("."):
            logger.warning("results: not writing test %r to a file: not a plain file name", whole["id"])
            return
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
            path = self.results_dir / name
            partial = path.with_name(f".{name}.partial")
            partial.write_text(json.dumps(whole, separators=(",", ":")), encoding="utf-8")
            partial.replace(path)
        except OSError as exc:
            logger.warning("results: could not write %s: %s", self.results_dir / name, exc)

    # -- the async interface

    async def create(self, test_id: str | None, started: bool) -> dict[str, Any]:
        """See `ResultsBackend.create`; a harness run of that id is 400 test-managed-by-harness."""
        return await self._call(self._create, test_id, started)

    async def start(self, test_id: str) -> dict[str, Any]:
        """See `ResultsBackend.start`."""
        return await self._call(self._start, test_id)

    async def summary(self, test_id: str) -> dict[str, Any]:
        """See `ResultsBackend.summary`."""
        return await self._call(self._summary, test_id)

    async def whole(self, test_id: str) -> dict[str, Any]:
        """See `ResultsBackend.whole`."""
        return await self._call(self._whole, test_id)

    async def add_metrics(self, test_id: str, peer_id: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """See `ResultsBackend.add_metrics`: a data point of the backend's group, entity = peer id."""
        return await self._call(self._add_metrics, test_id, peer_id, metrics)

    async def add_results(self, test_id: str, peer_id: str, results: dict[str, Any]) -> dict[str, Any]:
        """See `ResultsBackend.add_results`: a data point of group `results`; the latest one counts."""
        return await self._call(self._add_results, test_id, peer_id, results)

    async def add_topology(self, test_id: str, topology: Any) -> dict[str, Any]:
        """See `ResultsBackend.add_topology`: a data point of group `topology`."""
        return await self._call(self._add_topology, test_id, topology)

    async def finish_test(self, test_id: str) -> dict[str, Any]:
        """See `ResultsBackend.finish_test`; writes the results file when `results_dir` is set."""
        return await self._call(self._finish, test_id)

    async def close(self) -> None:
        """Stop the database thread and release the connections."""
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        self.store.close()


MetricsCallback = Callable[[str, dict[str, Any], float], Any]
"""`(peer_id, metrics, t)`, t in epoch seconds; may return an awaitable, which is awaited."""


class RunBackend(ResultsBackend):
    """One test in memory: the current harness run, already started, finished by `finish()`.

    `on_metrics(peer_id, metrics, t)` is called for every accepted metrics PUT (t = the data point's
    timestamp in epoch seconds) and `on_results(peer_id, results, t)` for every results PUT; either may
    return an awaitable. Other test ids are 404; the API cannot create, start or finish this test (400
    `test-managed-by-harness`). The newest `keep` data points and topology snapshots stay in memory for
    `GET /test/{id}?dataPoints=true`.
    """

    def __init__(
        self,
        test_id: str,
        started_ms: int,
        on_metrics: MetricsCallback,
        on_results: MetricsCallback | None = None,
        *,
        keep: int = 1000,
    ) -> None:
        self.test_id = test_id
        self.started_ms = int(started_ms)
        self.finished_ms: int | None = None
        self.on_metrics = on_metrics
        self.on_results = on_results
        self.data_points: deque[dict[str, Any]] = deque(maxlen=keep)
        self.topology: deque[dict[str, Any]] = deque(maxlen=keep)
        self.results: dict[str, Any] = {}
        self.metrics_received = 0

    def finish(self, finished_ms: int | None = None) -> None:
        """Finish the test (now, or at `finished_ms`): later metrics PUTs get 400 test-already-finished."""
        if self.finished_ms is None:
            self.finished_ms = _now_ms() if finished_ms is None else int(finished_ms)

    def _ongoing(self, test_id: str) -> None:
        if test_id != self.test_id:
            raise not_found()
        check_ongoing(self.started_ms, self.finished_ms)

    async def create(self, test_id: str | None, started: bool) -> dict[str, Any]:
        """Not here: 400 test-managed-by-harness."""
        raise managed()

    async def start(self, test_id: str) -> dict[str, Any]:
        """Not here: 404 for another id, else 400 test-managed-by-harness."""
        if test_id != self.test_id:
            raise not_found()
        raise managed()

    async def summary(self, test_id: str) -> dict[str, Any]:
        """See `ResultsBackend.summary`."""
        if test_id != self.test_id:
            raise not_found()
        return {"id": self.test_id, "started": self.started_ms, "finished": self.finished_ms}

    async def whole(self, test_id: str) -> dict[str, Any]:
        """See `ResultsBackend.whole` (the newest `keep` data points)."""
        if test_id != self.test_id:
            raise not_found()
        return whole_test(
            self.test_id, self.started_ms, self.finished_ms, self.data_points, self.topology, self.results
        )

    async def add_metrics(self, test_id: str, peer_id: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """See `ResultsBackend.add_metrics`; calls `on_metrics`."""
        self._ongoing(test_id)
        now_ms = _now_ms()
        point = {"peerId": peer_id, "timestamp": now_ms, "metrics": metrics}
        self.data_points.append(point)
        self.metrics_received += 1
        outcome = self.on_metrics(peer_id, metrics, now_ms / 1000)
        if inspect.isawaitable(outcome):
            await outcome
        return point

    async def add_results(self, test_id: str, peer_id: str, results: dict[str, Any]) -> dict[str, Any]:
        """See `ResultsBackend.add_results`; calls `on_results`."""
        self._ongoing(test_id)
        now_ms = _now_ms()
        entry = {**results, "timestamp": now_ms}
        self.results[peer_id] = entry
        if self.on_results is not None:
            outcome = self.on_results(peer_id, entry, now_ms / 1000)
            if inspect.isawaitable(outcome):
                await outcome
        return entry

    async def add_topology(self, test_id: str, topology: Any) -> dict[str, Any]:
        """See `ResultsBackend.add_topology`."""
        self._ongoing(test_id)
        self.topology.append({"timestamp": _now_ms(), "topology": topology})
        return {"id": self.test_id, "started": self.started_ms}

    async def finish_test(self, test_id: str) -> dict[str, Any]:
        """Not here: 404 for another id, else 400 test-managed-by-harness (the owner calls `finish()`)."""
        if test_id != self.test_id:
            raise not_found()
        raise managed()


# --- InfluxDB export ------------------------------------------------------------------------------


def _escape(text: str, specials: str) -> str:
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    for char in specials:
        text = text.replace(char, "\\" + char)
    return text


def _escape_measurement(text: str) -> str:
    return _escape(text, ", ")


def _escape_key(text: str) -> str:
    """A tag key, tag value or field key: commas, equals signs and spaces escaped."""
    return _escape(text, ",= ")


def _number(value: Any) -> str:
    """A field value as JavaScript would print the number; anything else (missing, NaN, text) is 0."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    return "0"


def _item(values: Any, index: int) -> Any:
    return values[index] if isinstance(values, list | tuple) and len(values) > index else None


def influx_lines(test_id: str, peer_id: str, metrics: Mapping[str, Any], t_ms: int) -> list[str]:
    """The original's InfluxDB lines for one metrics data point (measurement `test-{id}`, tag `peer`).

    One line per family F with `FCount, FBytes, FTotal, FTotalBytes, FPerSecond, FBytesPerSecond`, then
    `x=position[0],y=position[2],knownPeers=knownPeersCount[,latency=averageLatency]`; a missing number
    is 0 and latency is left out unless non-zero, as the original's `averageLatency ? ... : ""`.
    """
    values: Mapping[str, Any] = metrics if isinstance(metrics, Mapping) else {}
    header = f"{_escape_measurement(f'test-{test_id}')},peer={_escape_key(peer_id)}"
    stamp = str(int(t_ms))
    lines = []
    for family in FAMILIES:
        fields = (
            (f"{family}Count", family),
            (f"{family}Bytes", f"{family}Bytes"),
            (f"{family}Total", f"{family}Total"),
            (f"{family}TotalBytes", f"{family}TotalBytes"),
            (f"{family}PerSecond", f"{family}PerSecond"),
            (f"{family}BytesPerSecond", f"{family}BytesPerSecond"),
        )
        body = ",".join(f"{_escape_key(name)}={_number(values.get(key))}" for name, key in fields)
        lines.append(f"{header} {body} {stamp}")
    position = values.get("position")
    body = (
        f"x={_number(_item(position, 0))},y={_number(_item(position, 2))},"
        f"knownPeers={_number(values.get('knownPeersCount'))}"
    )
    latency = values.get("averageLatency")
    if _number(latency) != "0":
        body += f",latency={_number(latency)}"
    lines.append(f"{header} {body} {stamp}")
    return lines


def influx_write_url(url: str) -> str:
    """A full write URL as given (its path ends in `write` or it has a query), else the original's
    `{url}write?db=comms&precision=ms` on a base URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.query or parts.path.rstrip("/").endswith("write"):
        return url
    return url.rstrip("/") + "/write?db=comms&precision=ms"


class InfluxWriter:
    """Posts InfluxDB lines in the background: batched, bounded, fire-and-forget.

    `write(lines)` only queues them (call it from the event loop). One task posts what is queued, up to
    `batch_lines` lines per request, with `content-type: csv` as the original; lines queued while a
    request is in flight go in the next one. Beyond `max_lines` queued, new lines are dropped and
    counted. Failures (HTTP >= 400 or no answer) are counted and logged once. `await close()` posts what
    is left and closes the HTTP session.
    """

    def __init__(
        self, url: str, *, batch_lines: int = 5000, max_lines: int = 100_000, timeout: float = 10.0
    ) -> None:
        self.url = influx_write_url(url)
        self.batch_lines = max(1, batch_lines)
        self.max_lines = max(1, max_lines)
        self.timeout = timeout
        self.sent_lines = 0
        self.requests = 0
        self.failures = 0
        self.failed_lines = 0
        self.dropped_lines = 0
        self._queue: deque[str] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self._warned = False
        self._warned_drop = False

    def stats(self) -> dict[str, Any]:
        """The writer's counters."""
        return {
            "url": self.url,
            "sent_lines": self.sent_lines,
            "requests": self.requests,
            "failures": self.failures,
            "failed_lines": self.failed_lines,
            "dropped_lines": self.dropped_lines,
            "queued_lines": len(self._queue),
        }

    def write(self, lines: Iterable[str]) -> None:
        """Queue `lines` to be posted; never blocks, never raises for the target's sake."""
        lines = list(lines)
        if self._closing:
            self.dropped_lines += len(lines)
            return
        room = self.max_lines - len(self._queue)
        if len(lines) > room:
            dropped = len(lines) - max(room, 0)
            self.dropped_lines += dropped
            if not self._warned_drop:
                self._warned_drop = True
                logger.warning(
                    "influx: queue full (%d lines): dropping lines for %s", self.max_lines, self.url
                )
            lines = lines[: max(room, 0)]
        if not lines:
            return
        self._queue.extend(lines)
        self._idle.clear()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="influx-writer")
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything queued so far has been posted (or failed)."""
        if self._task is not None and not self._task.done():
            await self._idle.wait()

    async def close(self) -> None:
        """Post what is queued, then stop and close the session."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                count = min(self.batch_lines, len(self._queue))
                batch = [self._queue.popleft() for _ in range(count)]
                await self._post(batch)
            self._idle.set()
            if self._closing:
                return

    async def _post(self, batch: list[str]) -> None:
        self.requests += 1
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
            async with self._session.post(
                self.url, data="\n".join(batch).encode(), headers={"content-type": "csv"}
            ) as response:
                if response.status >= 400:
                    text = (await response.text(errors="replace"))[:200]
                    self._failed(batch, f"HTTP {response.status}" + (f": {text}" if text else ""))
                    return
                await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._failed(batch, f"{type(exc).__name__}: {exc}")
            return
        self.sent_lines += len(batch)

    def _failed(self, batch: list[str], reason: str) -> None:
        self.failures += 1
        self.failed_lines += len(batch)
        if not self._warned:
            self._warned = True
            logger.warning(
                "influx: pushing to %s failed (%s); further failures are only counted", self.url, reason
            )
        else:
            logger.debug("influx: pushing to %s failed (%s)", self.url, reason)


# --- routes ---------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _json_body(request: web.Request) -> Any:
    """The request's JSON body (`{}` when empty, as express.json leaves it); 400 when not JSON."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ResultsError(400, "bad-request", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict | list):
        # express.json's strict mode takes objects and arrays only.
        raise ResultsError(400, "bad-request", "the body must be a JSON object or array")
    return body


async def _object_body(request: web.Request) -> dict[str, Any]:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ResultsError(400, "bad-request", "the body must be a JSON object")
    return body


def _truthy(value: Any) -> bool:
    """JavaScript truthiness, for `{"started": ...}`."""
    if isinstance(value, float) and math.isnan(value):
        return False
    if isinstance(value, list | dict):
        return True
    return bool(value)


def _answers(handler: Handler) -> Handler:
    """Turn `ResultsError` into its JSON answer and any other failure into a 500 without a traceback."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ResultsError as exc:
            return web.json_response(exc.body(), status=exc.http_status)
        except (web.HTTPException, asyncio.CancelledError):
            raise
        except Exception as exc:
            logger.exception("results: %s %s failed", request.method, request.path)
            return web.json_response(
                {"status": "internal-error", "message": f"{type(exc).__name__}: {exc}"}, status=500
            )

    return wrapped


CORS_METHODS = "GET,HEAD,PUT,PATCH,POST,DELETE"


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What express's `cors()` does: `Access-Control-Allow-Origin: *` on everything, preflights 204."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
        asked = request.headers.get("Access-Control-Request-Headers")
        if asked:
            response.headers["Access-Control-Allow-Headers"] = asked
            response.headers["Vary"] = "Access-Control-Request-Headers"
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers["Access-Control-Allow-Origin"] = "*"
            raise
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response


RESULTS_BACKEND = web.AppKey("results_backend", ResultsBackend)
"""Where `add_results_routes` keeps the app's backend."""

INFLUX_WRITER = web.AppKey("results_influx", InfluxWriter)
"""Where `add_results_routes` keeps the app's `InfluxWriter`, when it has one."""


def _has_route(app: web.Application, method: str, path: str) -> bool:
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        if route.method == method and info.get("path") == path:
            return True
    return False


def add_results_routes(
    app: web.Application,
    backend: ResultsBackend,
    *,
    influx: InfluxWriter | None = None,
    cors: bool = True,
) -> None:
    """Add the original results server's routes over `backend` to `app` (see the module docstring).

    With `influx`, every accepted metrics PUT is also queued as InfluxDB lines. With `cors`, a CORS
    middleware is put outermost, so that every answer of the app (errors, 503s too) allows any origin
    and preflights are answered before anything else. `GET /status` is added unless the app has it.
    The backend (and the writer) are closed when the app is cleaned up.
    """
    app[RESULTS_BACKEND] = backend
    if influx is not None:
        app[INFLUX_WRITER] = influx
    if cors:
        app.middlewares.insert(0, cors_middleware)

    async def status(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def create(request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        started = isinstance(body, dict) and _truthy(body.get("started"))
        return web.json_response(await backend.create(request.match_info.get("testId"), started))

    async def start(request: web.Request) -> web.StreamResponse:
        return web.json_response(await backend.start(request.match_info["testId"]))

    async def get_test(request: web.Request) -> web.StreamResponse:
        test_id = request.match_info["testId"]
        if request.query.get("dataPoints") == "true":
            return web.json_response(await backend.whole(test_id))
        return web.json_response(await backend.summary(test_id))

    async def metrics(request: web.Request) -> web.StreamResponse:
        test_id, peer_id = request.match_info["testId"], request.match_info["peerId"]
        body = await _object_body(request)
        point = await backend.add_metrics(test_id, peer_id, body)
        if influx is not None:
            influx.write(influx_lines(test_id, peer_id, body, point["timestamp"]))
        return web.json_response(point)

    async def results(request: web.Request) -> web.StreamResponse:
        body = await _object_body(request)
        test_id, peer_id = request.match_info["testId"], request.match_info["peerId"]
        return web.json_response(await backend.add_results(test_id, peer_id, body))

    async def topology(request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        return web.json_response(await backend.add_topology(request.match_info["testId"], body))

    async def finish(request: web.Request) -> web.StreamResponse:
        return web.json_response(await backend.finish_test(request.match_info["testId"]))

    router = app.router
    if not _has_route(app, "GET", "/status"):
        router.add_get("/status", status)
    router.add_post("/test", _answers(create))
    router.add_post("/test/{testId}", _answers(create))
    router.add_get("/test/{testId}", _answers(get_test))
    router.add_put("/test/{testId}/start", _answers(start))
    router.add_put("/test/{testId}/peer/{peerId}/metrics", _answers(metrics))
    router.add_put("/test/{testId}/peer/{peerId}/results", _answers(results))
    router.add_put("/test/{testId}/topology", _answers(topology))
    router.add_put("/test/{testId}/finish", _answers(finish))

    async def cleanup(_app: web.Application) -> None:
        if influx is not None:
            await influx.close()
        await backend.close()

    app.on_cleanup.append(cleanup)


# --- the embedded target --------------------------------------------------------------------------


class ResultsConfig(ServiceModelConfig):
    """The configuration of the `results` target."""

    concurrency: int = Field(default=16, ge=1)
    """How many requests are served at once."""

    service_time: Distribution = Field(default=0.001, validate_default=True)
    """The time every request costs before its route's own work."""

    queue_limit: int = Field(default=1024, ge=0)
    """How many requests may wait for a free worker; any beyond this get 503 at once."""

    seed: int | None = 0
    """Seeds the service-time and error sampling; none means random."""

    db: str | None = None
    """The harness database the tests live in (a file or a postgresql:// URL); none means harness's
    default (`$HARNESS_DB`, else ./harness-data/harness.db)."""

    group: str = "peers"
    """The data point group of the metrics (the simulator group of the peers of a harness run)."""

    results_dir: str | None = None
    """Where a finished test is also written as `<id>.json`, as the original did; none writes nothing."""

    influx_url: str | None = None
    """An InfluxDB to push every metrics data point to (a base URL, to which `write?db=comms&precision=ms`
    is appended, or a full write URL); none pushes nothing."""

    @field_validator("group")
    @classmethod
    def _group_name(cls, value: str) -> str:
        if not value or value in (RESULTS_GROUP, TOPOLOGY_GROUP):
            raise ValueError(f"must be a name other than {RESULTS_GROUP!r} and {TOPOLOGY_GROUP!r}")
        return value


def build_app(config: ResultsConfig) -> web.Application:
    """The results server over the harness database, with `config`'s service model in front of it."""
    app = web.Application(client_max_size=MAX_BODY)
    # `/status` is the health path: it answers the original's `{"status": "ok"}` and bypasses the model.
    instrument(app, ServiceModel(config, seed=config.seed), health_path="/status")
    backend = StoreBackend(config.db, group=config.group, results_dir=config.results_dir)
    influx = InfluxWriter(config.influx_url) if config.influx_url else None
    add_results_routes(app, backend, influx=influx)
    return app
