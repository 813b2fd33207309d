"""What `mlops-sdk` adds around the pluto-ml SDK to see its uploads: an in-process sync thread, a SQLite
watcher, one shared system probe and a guard against the heartbeat's `os._exit`.

pluto-ml has no acknowledgment hook. `run.log()` only appends a row to the run's SQLite queue
(`<dir>/.pluto/<project>/<run id>/sync.db`, table `sync_queue`); an uploader reads up to
`sync_process_batch_size` rows every `sync_process_flush_interval`, POSTs them and marks them
COMPLETED (status 2) after a 2xx, or FAILED (status 3, `retry_count + 1`) once its own HTTP retries
(up to `sync_process_retry_max` attempts, 1-2-4-8 s apart) are spent. So there are two ways to see
when a row reached the server:

- `DbWatcher` (sync `process`, the SDK's default): one thread per worker polls every open run's
  sync.db read-only every `interval` and reports each metric row the first time it is COMPLETED, at
  the midpoint of the two polls around its completion (so within ±interval/2 of the real time), and
  each row the first time its `retry_count` is above 0. The SDK's sync subprocess is untouched.
- `ThreadSync` (sync `thread`): the SDK's own upload functions (`pluto.sync.process._SyncUploader`,
  `_sync_batch`, `_flush_remaining`) in one thread per run inside this process instead of one
  `python -m pluto.sync` subprocess per run (about 52 MB each), with the same cadence, plus exact
  acknowledgment times and the number of HTTP attempts each batch took. Built on private SDK
  functions: `check_thread_sync` verifies they are there and say which are missing.

Both report to a `sink(db_path, acked, retried_points)` called in their own thread: `acked` is a list
of `(created_at, points, acked_at)` per metric row (`created_at` is the SDK's own `time.time()` when
`run.log` queued the row), `retried_points` the points of rows that needed more than one attempt,
each row counted once.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Acked = tuple[float, int, float]
"""One acknowledged metric row: (created_at, points, acked_at), both times from `time.time()`."""
Sink = Callable[[str, list[Acked], int], None]
"""Receives (db_path, acknowledged rows, points of rows retried for the first time)."""

METRIC = 0
"""`RecordType.METRIC` in `sync_queue.record_type`."""
COMPLETED = 2
"""`SyncStatus.COMPLETED` in `sync_queue.status`."""
TESTED_VERSION = "0.0.29"
"""The pluto-ml version whose sync internals `ThreadSync` was written against."""
_IN_CHUNK = 500


# --- sync `thread`: the SDK's uploader in a thread ------------------------------------------------


class ThreadSync:
    """Stands in for the sync subprocess's `Popen`: the SDK's upload loop in a thread of this process."""

    def __init__(self, manager: Any, sink: Sink) -> None:
        self.pid = os.getpid()
        self.returncode: int | None = None
        self._manager = manager
        self._sink = sink
        self._stop = threading.Event()
        self._attempts = 0
        self._retried: set[int] = set()
        self._log = logging.getLogger("pluto-sync-thread")
        self._thread = threading.Thread(target=self._run, name=f"pluto-sync-{manager.run_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from pluto.sync import process as sp
        from pluto.sync.store import SyncStore

        s = self._manager.settings
        store = SyncStore(self._manager.db_path)
        uploader = sp._SyncUploader(s, self._log)
        self._instrument(uploader)
        retry_max = s.get("sync_process_retry_max", 5)
        flush_interval = s.get("sync_process_flush_interval", 1.0)
        last_flush = last_health = last_cleanup = time.time()
        try:
            # the cadence of `pluto.sync.process._sync_main`: wake every 0.1 s, upload once a flush interval
            while not self._stop.is_set():
                try:
                    now = time.time()
                    if now - last_flush > flush_interval:
                        sp._sync_batch(
                            store,
                            uploader,
                            self._log,
                            retry_max,
                            s.get("sync_process_batch_size", 100),
                            s.get("sync_process_file_batch_size", 10),
                            backoff_base=s.get("sync_process_retry_backoff", 2.0),
                        )
                        last_flush = time.time()
                    if now - last_cleanup > 300.0:
                        store.cleanup_completed(older_than_seconds=300.0)
                        last_cleanup = now
                    if now - last_health > 60.0:
                        with contextlib.suppress(Exception):
                            uploader.upload_health_stats(store.get_health_stats())
                        last_health = now
                except sqlite3.OperationalError as exc:
                    self._log.warning("transient SQLite error (will retry): %s", exc)
                self._stop.wait(0.1)
            sp._flush_remaining(
                store, uploader, self._log, s.get("sync_process_shutdown_timeout", 30.0), retry_max
            )
        except Exception as exc:  # as the subprocess: log, never take the caller down
            self._log.error("sync thread failed: %s", exc, exc_info=True)
        finally:
            uploader.close()
            store.close()
            self.returncode = 0

    def _instrument(self, uploader: Any) -> None:
        """Count the HTTP attempts of each metrics upload and report its rows once it is acknowledged."""
        client = uploader.client
        post = client.post

        def counting_post(*args: Any, **kwargs: Any) -> Any:
            self._attempts += 1
            return post(*args, **kwargs)

        client.post = counting_post
        upload = uploader.upload_metrics_batch

        def upload_metrics_batch(records: list[Any]) -> None:
            self._attempts = 0
            try:
                upload(records)
            except BaseException:
                self._report(records, None)
                raise
            self._report(records, time.time())

        uploader.upload_metrics_batch = upload_metrics_batch

    def _report(self, records: list[Any], acked_at: float | None) -> None:
        retried = 0
        if acked_at is None or self._attempts > 1 or any(r.retry_count for r in records):
            for r in records:
                if r.id not in self._retried:
                    self._retried.add(r.id)
                    retried += len(r.payload)
        acked = [] if acked_at is None else [(r.created_at, len(r.payload), acked_at) for r in records]
        if acked or retried:
            self._sink(self._manager.db_path, acked, retried)

    # the `subprocess.Popen` methods SyncProcessManager uses
    def poll(self) -> int | None:
        """None while the thread runs, then 0."""
        return None if self._thread.is_alive() else 0

    def terminate(self) -> None:
        """Ask the loop to stop; it flushes what is left (as the subprocess does on SIGTERM)."""
        self._stop.set()

    kill = terminate

    def wait(self, timeout: float | None = None) -> int:
        """Join the thread; `subprocess.TimeoutExpired` if it is still running after `timeout`."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("pluto-sync-thread", timeout or 0.0)
        return 0


_thread_dirs: dict[str, Sink] = {}
_install_lock = threading.Lock()
_original_start: Any = None


def check_thread_sync() -> list[str]:
    """The SDK internals `ThreadSync` needs that this pluto-ml lacks (empty if it has them all)."""
    from pluto.sync import process as sp
    from pluto.sync import store

    missing = []
    needs: list[tuple[Any, str, tuple[str, ...]]] = [
        (sp, "_sync_batch", ("store", "uploader", "log", "max_retries", "batch_size", "backoff_base")),
        (sp, "_flush_remaining", ("store", "uploader", "log", "timeout", "max_retries")),
        (sp, "_SyncUploader", ("settings_dict", "log")),
        (store, "SyncStore", ("db_path",)),
    ]
    for module, name, params in needs:
        func = getattr(module, name, None)
        if func is None:
            missing.append(f"pluto.sync.{module.__name__.rsplit('.', 1)[-1]}.{name}")
            continue
        have = inspect.signature(func).parameters
        missing += [f"{name}({p})" for p in params if p not in have]
    for attr in ("client", "upload_metrics_batch", "upload_health_stats", "close", "set_urgent_mode"):
        if not hasattr(sp._SyncUploader, attr):
            missing.append(f"_SyncUploader.{attr}")
    if not hasattr(sp.SyncProcessManager, "_start_or_attach"):
        missing.append("SyncProcessManager._start_or_attach")
    return missing


def install_thread_sync() -> None:
    """Make runs whose `dir` is registered with `register_thread_dir` sync in a thread (idempotent).

    Patches `SyncProcessManager._start_or_attach` once; runs in other directories keep the subprocess.
    """
    global _original_start
    from pluto.sync.process import SyncProcessManager

    with _install_lock:
        if _original_start is not None:
            return
        original = SyncProcessManager._start_or_attach

        def _start_or_attach(self: Any) -> None:
            sink = _thread_dirs.get(str(self.settings.get("dir")))
            if sink is None:
                original(self)
                return
            if self._started:
                return
            self._process = ThreadSync(self, sink)
            self._started = True

        SyncProcessManager._start_or_attach = _start_or_attach
        _original_start = original


def register_thread_dir(directory: str, sink: Sink) -> None:
    """Runs created with `dir=directory` sync in a thread, reporting to `sink`."""
    _thread_dirs[directory] = sink


def unregister_thread_dir(directory: str) -> None:
    """Runs created with `dir=directory` from now on sync in the SDK's subprocess again."""
    _thread_dirs.pop(directory, None)


# --- sync `process`: watch the SQLite queue -------------------------------------------------------


class _Watched:
    __slots__ = ("conn", "last_poll", "max_seen", "path", "retried", "unresolved")

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.max_seen = 0
        self.unresolved: dict[int, tuple[float, int]] = {}
        """Row id → (created_at, points) of metric rows not yet COMPLETED."""
        self.retried: set[int] = set()
        self.last_poll = time.time()


class DbWatcher:
    """Polls every open run's sync.db, read-only, and reports metric rows as the SDK completes them."""

    def __init__(self, sink: Sink, interval: float = 0.05) -> None:
        self.interval = interval
        self._sink = sink
        self._runs: dict[str, _Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pluto-db-watcher", daemon=True)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def add(self, db_path: str) -> None:
        """Watch one more run's sync.db."""
        with self._lock:
            self._runs.setdefault(db_path, _Watched(db_path))

    def final(self, db_path: str) -> None:
        """Poll `db_path` once more (after its run finished), report, then stop watching it."""
        with self._lock:
            watched = self._runs.pop(db_path, None)
            if watched is not None:
                self._poll(watched)
                self._close(watched)

    def stop(self) -> None:
        """Stop polling and close every connection (without a last poll)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            for watched in self._runs.values():
                self._close(watched)
            self._runs.clear()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                for watched in list(self._runs.values()):
                    self._poll(watched)

    @staticmethod
    def _close(watched: _Watched) -> None:
        if watched.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                watched.conn.close()
            watched.conn = None

    def _poll(self, w: _Watched) -> None:
        now = time.time()
        acked: list[Acked] = []
        retried = 0
        try:
            if w.conn is None:
                if not os.path.exists(w.path):
                    return
                w.conn = sqlite3.connect(
                    f"file:{w.path}?mode=ro", uri=True, timeout=1.0, check_same_thread=False
                )
            fresh = w.conn.execute(
                "SELECT id, created_at, payload_json, status, retry_count FROM sync_queue "
                "WHERE id > ? AND record_type = ? ORDER BY id",
                (w.max_seen, METRIC),
            ).fetchall()
            changed: list[tuple[int, int, int]] = []
            ids = list(w.unresolved)
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i : i + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                changed += w.conn.execute(
                    f"SELECT id, status, retry_count FROM sync_queue WHERE id IN ({marks})"
                    " AND (status = ? OR retry_count > 0)",
                    (*chunk, COMPLETED),
                ).fetchall()
        except sqlite3.Error as exc:  # locked for longer than the timeout, or a torn read: next poll
            log.debug("sync.db poll of %s failed: %s", w.path, exc)
            return
        for row_id, created_at, payload, status, retries in fresh:
            w.max_seen = max(w.max_seen, row_id)
            try:
                points = len(json.loads(payload))
            except ValueError:
                points = 0
            w.unresolved[row_id] = (created_at, points)
            changed.append((row_id, status, retries))
        for row_id, status, retries in changed:
            created_at, points = w.unresolved[row_id]
            if retries and row_id not in w.retried:
                w.retried.add(row_id)
                retried += points
            if status == COMPLETED:
                del w.unresolved[row_id]
                # completed after the previous poll (and after the row existed), by this one
                acked.append((created_at, points, (max(w.last_poll, created_at) + now) / 2))
        w.last_poll = now
        if acked or retried:
            self._sink(w.path, acked, retried)


# --- shared pieces --------------------------------------------------------------------------------


class SharedSys:
    """Stands in for `pluto.sys.System`, one per worker: host info collected once, not per run.

    `pluto.init` builds a `System` for every run unless `settings._sys` is set, which spawns `uname`,
    `git`, `nvidia-smi`, `ldconfig`, `gcc` … each time. Runs get the same `get_info()` (the create
    request's `systemMetadata`); `monitor()` samples this host for every run under a lock when
    `monitor` is set, and is empty otherwise.
    """

    def __init__(self, monitor: bool) -> None:
        import pluto
        from pluto.sets import setup

        self._real = pluto.System(setup({}))
        self._info = self._real.get_info()
        self._monitor = monitor
        self._lock = threading.Lock()

    def get_info(self) -> dict[str, Any]:
        """The host's info, collected once."""
        return self._info

    def monitor(self) -> dict[str, Any]:
        """One sample of the host's CPU, memory, disk and network, or {} without monitoring."""
        if not self._monitor:
            return {}
        with self._lock:
            try:
                return dict(self._real.monitor())
            except Exception:
                return {}


_guarded = False
CANCELLED_FLAG = "_harness_cancelled"
"""Set on a run's settings (`op.settings`) when its heartbeat answered CANCELLED."""


def guard_cancel() -> None:
    """Stop a heartbeat's CANCELLED from ending the whole process (idempotent).

    `OpMonitor` posts a heartbeat every few seconds and, when the server answers CANCELLED, calls
    `os._exit(2)`: right for one training script, fatal for a worker holding dozens of runs. The
    heartbeat's answer is passed on as no answer instead, and the run's settings get `CANCELLED_FLAG`
    (see `was_cancelled`).
    """
    global _guarded
    from pluto.iface import ServerInterface

    with _install_lock:
        if _guarded:
            return
        original = ServerInterface._post_v1

        def _post_v1(self: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
            reply = original(self, url, *args, **kwargs)
            if reply is not None and url == getattr(self.settings, "url_trigger", None):
                try:
                    status = reply.json().get("status")
                except Exception:
                    status = None
                if status == "CANCELLED":
                    setattr(self.settings, CANCELLED_FLAG, True)
                    return None
            return reply

        ServerInterface._post_v1 = _post_v1
        _guarded = True


def was_cancelled(op: Any) -> bool:
    """Whether the server cancelled this run (`op` is the SDK's run object)."""
    return bool(getattr(op.settings, CANCELLED_FLAG, False))
