"""The panel's runs: at most one active `RunController`, its live ticks pushed to Socket.IO rooms.

A run's controller runs in a daemon thread. The collector's thread hands each tick to a queue; one
Socket.IO background task per run drains it, keeps the last `KEEP_TICKS` for late joiners, emits
`tick` to the room `run:<id>` and `run_status` to everyone when the status changes (STYLE 4: a
background task emits to clients).

With several panel processes (`web.cluster`), each publishes its active run's state and ticks, and
the queries and controls here answer for another process's run too: `live`, `groups`, `status_of`,
`join`, `stop` and `scale` take any active run's id.
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
from typing import TYPE_CHECKING, Any

from harness.controller import RunController, RunOptions
from harness.errors import EXIT_ABORTED, HarnessError, UsageError
from harness.profile import LoadedProfile
from harness.report.html import redact
from harness.store import Store, data_dir_of, db_arg

if TYPE_CHECKING:
    from web.cluster import Cluster

log = logging.getLogger(__name__)

KEEP_TICKS = 600
"""Ticks kept per active run for a client that joins late (ten minutes at one a second)."""
RECOVER_EVERY_S = 10.0
"""How often the run list may look for runs whose controller died (see `RunManager.recover_stale`)."""
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
        cluster: Cluster | None = None,
    ) -> None:
        self.db_path = db_arg(db_path)
        self.agent_hub = agent_hub
        """The app's agents hub (`web.agents.AgentHub`), for runs of profiles with `agents:`."""
        self.cluster = cluster
        """The other panel processes (None: this process is the whole panel)."""
        self._emit = emit
        self._start_task = start_task
        self.log_level = log_level
        self._lock = threading.RLock()
        self._records: OrderedDict[str, RunRecord] = OrderedDict()
        self._active: RunRecord | None = None
        self._recovered_at = -RECOVER_EVERY_S

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

    def remote(self, run_id: str) -> dict[str, Any] | None:
        """Another panel process's active run, as it last published it (see `_published`)."""
        if self.cluster is None or run_id in self._records:
            return None
        return self.cluster.state(run_id)

    def remote_runs(self) -> dict[str, dict[str, Any]]:
        """Every other panel process's active run: id → its published state."""
        if self.cluster is None:
            return {}
        return {k: v for k, v in self.cluster.active_runs().items() if k not in self._records}

    def active_statuses(self) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """The status of every active run of every panel process (run id → status), and the other
        processes' published states — one look at Redis for a whole run list."""
        remote = self.remote_runs()
        statuses = {run_id: str(state.get("status")) for run_id, state in remote.items()}
        statuses.update({r.run_id: r.controller.status for r in self._records.values() if r.active})
        return statuses, remote

    def status_of(self, run_id: str) -> str | None:
        """The status of an active run of any panel process (None: not active anywhere)."""
        record = self._records.get(run_id)
        if record is not None:
            return record.controller.status if record.active else None
        remote = self.remote(run_id)
        return str(remote["status"]) if remote is not None else None

    def live(self, run_id: str) -> dict[str, Any] | None:
        """The latest tick of an active run."""
        record = self._records.get(run_id)
        if record is None:
            remote = self.remote(run_id)
            return remote.get("live") if remote is not None else None
        if not record.active or not record.ticks:
            return None
        return record.ticks[-1]

    def groups(self, run_id: str) -> dict[str, dict[str, Any]] | None:
        """The supervisor's per-group state of an active run (mode, target, workers, state)."""
        record = self._records.get(run_id)
        if record is None:
            remote = self.remote(run_id)
            return remote.get("groups") if remote is not None else None
        if not record.active:
            return None
        return _group_state(record)

    def group_modes(self, run_id: str) -> dict[str, str] | None:
        """Group name → `open` or `closed` for an active run of any panel process."""
        record = self._records.get(run_id)
        if record is None:
            remote = self.remote(run_id)
            return remote.get("modes") if remote is not None else None
        if not record.active:
            return None
        return {name: g.mode for name, g in record.controller.loaded.profile.groups.items()}

    def join(self, run_id: str, join_room: Callable[[], None]) -> list[dict[str, Any]]:
        """Join a run's room and return its recent ticks: each later tick reaches the joiner (exactly once
        from this process; from another process's run a tick may come twice, never not at all)."""
        with self._lock:
            join_room()
            record = self._records.get(run_id)
            if record is not None:
                return list(record.ticks)
        if self.cluster is not None:
            return self.cluster.ticks(run_id)
        return []

    def recover_stale(self, store: Store) -> list[str]:
        """Mark as aborted the stored `running` runs whose controller has died (at most every
        `RECOVER_EVERY_S`); the ids it marked."""
        now = time.monotonic()
        if now - self._recovered_at < RECOVER_EVERY_S:
            return []
        self._recovered_at = now
        recovered = store.recover_aborted()
        for run_id in recovered:
            log.warning("run %s: its controller died; marked aborted", run_id)
        return recovered

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
            if self.cluster is not None:  # the other processes know of it before its id is returned
                self.cluster.serve(self._forwarded)
                self.cluster.publish_state(record.run_id, lambda: self._published(record), force=True)
            record.thread = threading.Thread(
                target=self._run, args=(record,), name=f"run-{record.run_id}", daemon=True
            )
            log.info("run %s (profile %s) started by %s", record.run_id, loaded.profile.name, who)
            record.thread.start()
            self._start_task(self._pump, record)
            return record.run_id

    def stop(self, run_id: str, who: str) -> None:
        """Ask an active run to stop gracefully (a second request stops it at once)."""
        if run_id not in self._records and self._forward({"op": "stop", "run_id": run_id, "who": who}):
            return
        record = self._require_active(run_id)
        log.info("run %s: stop requested by %s", run_id, who)
        record.controller.stop(who=who)

    def scale(self, run_id: str, group: str, value: float | None, who: str) -> None:
        """Hold a group of an active run at `value` users or iterations/s (None: follow its shape)."""
        request = {"op": "scale", "run_id": run_id, "group": group, "value": value, "who": who}
        if run_id not in self._records and self._forward(request):
            return
        record = self._require_active(run_id)
        record.controller.scale(group, value, who=who)

    def _forward(self, request: dict[str, Any]) -> bool:
        """Hand a request for another process's active run to that process; False if none has it."""
        remote = self.remote(str(request["run_id"]))
        if remote is None or self.cluster is None:
            return False
        self.cluster.forward(str(remote["owner"]), request)
        return True

    def _forwarded(self, request: dict[str, Any]) -> None:
        """A request another panel process forwarded to this one (it owns the run)."""
        run_id, who = str(request.get("run_id")), f"{request.get('who')} (via another panel process)"
        if run_id not in self._records:
            raise RunNotFound(f"run {run_id} is not running in this panel")
        if request.get("op") == "stop":
            self.stop(run_id, who)
        elif request.get("op") == "scale":
            value = request.get("value")
            self.scale(run_id, str(request.get("group")), None if value is None else float(value), who)
        else:
            raise UsageError(f"unknown request {request.get('op')!r}")

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
                out = {**tick, "run_id": record.run_id}
                if self.cluster is not None:  # before the emit: a joiner elsewhere never misses it
                    self.cluster.publish_tick(record.run_id, out)
                with self._lock:
                    record.ticks.append(tick)
                    self._safe_emit("tick", out, to=room(record.run_id))
            if done and record.inbox.empty():
                break
            changed = controller.status != last_status
            if self.cluster is not None and not done:
                self.cluster.publish_state(record.run_id, lambda: self._published(record), force=changed)
            if changed:
                last_status = controller.status
                self._safe_emit("run_status", record.status_event())
        with self._lock:
            record.ticks.clear()  # only an active run's ticks are kept; the database has the rest
        if self.cluster is not None:
            self.cluster.forget(record.run_id)
        self._safe_emit("run_status", record.status_event())  # the final one, with the exit code

    def _published(self, record: RunRecord) -> dict[str, Any]:
        """What the other panel processes see of this process's active run."""
        c = record.controller
        return {
            "status": c.status,
            "profile": c.loaded.profile.name,
            "description": c.loaded.profile.description,
            "planned_duration_s": c.loaded.profile.duration,
            "raw": redact(c.loaded.raw),  # secrets never leave the owner, as in the API
            "started_at": c.started_at or record.created_at,
            "live": record.ticks[-1] if record.ticks else None,
            "groups": _group_state(record),
            "modes": {name: g.mode for name, g in c.loaded.profile.groups.items()},
        }

    def _safe_emit(self, event: str, data: dict[str, Any], to: str | None = None) -> None:
        try:
            self._emit(event, data, to=to)
        except Exception:
            log.exception("could not emit %s", event)


def _group_state(record: RunRecord) -> dict[str, dict[str, Any]]:
    """The supervisor's per-group state, or the profile's groups while it is starting."""
    supervisor = record.controller.supervisor
    if supervisor is None:
        return {
            name: {"mode": g.mode, "target": g.base, "workers": 0, "state": "starting"}
            for name, g in record.controller.loaded.profile.groups.items()
        }
    return supervisor.group_state()


def _frozen(tick: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy of a tick, so the collector's next tick never changes what was sent."""
    frozen: dict[str, Any] = json.loads(json.dumps(tick, default=str))
    return frozen
