"""The panel's runs: at most one active `RunController`, its live ticks pushed to Socket.IO rooms.

A run's controller runs in a daemon thread. The collector's thread hands each tick to a queue; one
Socket.IO background task per run drains it, keeps the last `KEEP_TICKS` for late joiners, emits
`tick` to the room `run:<id>` and `run_status` to everyone when the status changes (STYLE 4: a
background task emits to clients).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.controller import RunController, RunOptions
from harness.errors import EXIT_ABORTED, HarnessError, UsageError
from harness.profile import LoadedProfile
from harness.store import data_dir_of, db_arg

log = logging.getLogger(__name__)

KEEP_TICKS = 600
"""Ticks kept per active run for a client that joins late (ten minutes at one a second)."""
KEEP_RECORDS = 50
"""Runs started by this process remembered in memory (a run that failed at start has no database row)."""


class RunConflict(UsageError):
    """A run is already active, or the run asked for is not active."""


class RunNotFound(UsageError):
    """No run with that id is known to this panel."""


def room(run_id: str) -> str:
    """The Socket.IO room of a run's ticks."""
    return f"run:{run_id}"


@dataclass
class RunRecord:
    """A run started by this panel process."""

    controller: RunController
    who: str
    created_at: float = field(default_factory=time.time)
    ticks: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=KEEP_TICKS))
    inbox: queue.SimpleQueue[dict[str, Any]] = field(default_factory=queue.SimpleQueue)
    exit_code: int | None = None
    """The run's exit code once it has ended (also for a run that could not start)."""
    thread: threading.Thread | None = None

    @property
    def run_id(self) -> str:
        """The controller's run id."""
        return self.controller.run_id

    @property
    def active(self) -> bool:
        """True until the controller's `run()` has returned."""
        return not self.controller.done.is_set()

    def status_event(self) -> dict[str, Any]:
        """The `run_status` payload."""
        c = self.controller
        out: dict[str, Any] = {"run_id": c.run_id, "status": c.status, "profile": c.loaded.profile.name}
        if c.error:
            out["error"] = c.error
        if self.exit_code is not None:
            out["exit_code"] = self.exit_code
        return out


class RunManager:
    """Starts, stops and scales the panel's one active run and streams its ticks."""

    def __init__(
        self,
        db_path: str | Path,
        emit: Callable[..., Any],
        start_task: Callable[..., Any],
        log_level: int = logging.INFO,
        agent_hub: Any = None,
    ) -> None:
        self.db_path = db_arg(db_path)
        self.agent_hub = agent_hub
        """The app's agents hub (`web.agents.AgentHub`), for runs of profiles with `agents:`."""
        self._emit = emit
        self._start_task = start_task
        self.log_level = log_level
        self._lock = threading.RLock()
        self._records: OrderedDict[str, RunRecord] = OrderedDict()
        self._active: RunRecord | None = None

    # -- queries ---------------------------------------------------------------------------
    @property
    def active(self) -> RunRecord | None:
        """The active run's record, if a run is active."""
        record = self._active
        return record if record is not None and record.active else None

    def get(self, run_id: str) -> RunRecord | None:
        """A run this process started (active or not), by id."""
        return self._records.get(run_id)

    def records(self) -> list[RunRecord]:
        """Runs this process started, newest first."""
        return list(reversed(self._records.values()))

    def live(self, run_id: str) -> dict[str, Any] | None:
        """The latest tick of an active run."""
        record = self._records.get(run_id)
        if record is None or not record.active or not record.ticks:
            return None
        return record.ticks[-1]

    def groups(self, run_id: str) -> dict[str, dict[str, Any]] | None:
        """The supervisor's per-group state of an active run (mode, target, workers, state)."""
        record = self._records.get(run_id)
        if record is None or not record.active:
            return None
        supervisor = record.controller.supervisor
        if supervisor is None:
            return {
                name: {"mode": g.mode, "target": g.base, "workers": 0, "state": "starting"}
                for name, g in record.controller.loaded.profile.groups.items()
            }
        return supervisor.group_state()

    def join(self, run_id: str, join_room: Callable[[], None]) -> list[dict[str, Any]]:
        """Join a run's room and return its recent ticks: each later tick reaches the joiner exactly once."""
        with self._lock:
            join_room()
            record = self._records.get(run_id)
            return list(record.ticks) if record is not None else []

    # -- control ---------------------------------------------------------------------------
    def start(
        self,
        loaded: LoadedProfile,
        who: str,
        report_dir: Path | None = None,
        view_mode: str = "none",
    ) -> str:
        """Start a run in a daemon thread; returns its id at once. RunConflict if one is active."""
        with self._lock:
            active = self.active
            if active is not None:
                raise RunConflict(f"run {active.run_id} is still {active.controller.status}: stop it first")
            options = RunOptions(
                db_path=self.db_path, view_mode=view_mode, log_level=self.log_level, agent_hub=self.agent_hub
            )
            controller = RunController(loaded, options)
            options.report_dir = report_dir or data_dir_of(self.db_path) / "runs" / controller.run_id
            record = RunRecord(controller, who)
            controller.add_listener(lambda tick: record.inbox.put(_frozen(tick)))
            self._records[record.run_id] = record
            while len(self._records) > KEEP_RECORDS:
                self._records.popitem(last=False)
            self._active = record
            record.thread = threading.Thread(
                target=self._run, args=(record,), name=f"run-{record.run_id}", daemon=True
            )
            log.info("run %s (profile %s) started by %s", record.run_id, loaded.profile.name, who)
            record.thread.start()
            self._start_task(self._pump, record)
            return record.run_id

    def stop(self, run_id: str, who: str) -> None:
        """Ask the active run to stop gracefully (a second request stops it at once)."""
        record = self._require_active(run_id)
        log.info("run %s: stop requested by %s", run_id, who)
        record.controller.stop(who=who)

    def scale(self, run_id: str, group: str, value: float | None, who: str) -> None:
        """Hold a group of the active run at `value` users or iterations/s (None: follow its shape)."""
        record = self._require_active(run_id)
        record.controller.scale(group, value, who=who)

    def shutdown(self, who: str = "panel shutdown", timeout: float = 60.0) -> None:
        """Stop the active run, if any, and wait for it to end."""
        record = self.active
        if record is None:
            return
        record.controller.stop(who=who)
        if not record.controller.done.wait(timeout):
            record.controller.stop(who=who, immediate=True)
            record.controller.done.wait(timeout)

    def _require_active(self, run_id: str) -> RunRecord:
        record = self._records.get(run_id)
        if record is None:
            raise RunNotFound(f"run {run_id} is not running in this panel")
        if not record.active:
            raise RunConflict(f"run {run_id} is not active (status {record.controller.status})")
        return record

    # -- threads ---------------------------------------------------------------------------
    def _run(self, record: RunRecord) -> None:
        try:
            result = record.controller.run()
            record.exit_code = result.exit_code
        except HarnessError as exc:
            record.exit_code = exc.exit_code
            log.error("run %s could not start: %s", record.run_id, exc)
        except BaseException:
            record.exit_code = EXIT_ABORTED
            log.exception("run %s failed", record.run_id)

    def _pump(self, record: RunRecord) -> None:
        """Background task: emit the run's ticks and status changes until it has ended."""
        controller = record.controller
        # every run's status sequence starts with "starting", however fast it moved on
        last_status = "starting"
        self._safe_emit(
            "run_status",
            {"run_id": record.run_id, "status": last_status, "profile": controller.loaded.profile.name},
        )
        announced = False
        while True:
            try:
                tick: dict[str, Any] | None = record.inbox.get(timeout=0.2)
            except queue.Empty:
                tick = None
            done = controller.done.is_set() and (record.thread is None or not record.thread.is_alive())
            if not announced and controller.collector is not None:
                announced = True
                controller.collector.event("operator_action", None, action="start", who=record.who)
            if tick is not None:
                with self._lock:
                    record.ticks.append(tick)
                    self._safe_emit("tick", {**tick, "run_id": record.run_id}, to=room(record.run_id))
            if done and record.inbox.empty():
                break
            if controller.status != last_status:
                last_status = controller.status
                self._safe_emit("run_status", record.status_event())
        with self._lock:
            record.ticks.clear()  # only an active run's ticks are kept; the database has the rest
        self._safe_emit("run_status", record.status_event())  # the final one, with the exit code

    def _safe_emit(self, event: str, data: dict[str, Any], to: str | None = None) -> None:
        try:
            self._emit(event, data, to=to)
        except Exception:
            log.exception("could not emit %s", event)


def _frozen(tick: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy of a tick, so the collector's next tick never changes what was sent."""
    frozen: dict[str, Any] = json.loads(json.dumps(tick, default=str))
    return frozen
