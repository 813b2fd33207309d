"""The supervisor: starts each group's worker processes, applies load shapes every second, watches
heartbeats, restarts crashed workers with backoff, and stops everything gracefully.

It runs inside the controller process. Workers are started with the `forkserver` method (a clean
fork, never of the threaded controller). One thread reads every worker's pipe and routes batches to
the collector and log records to the controller's log; `tick()` (called once a second by the
controller's main loop) does the rest, so all decisions happen on one thread.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from harness.collector import Collector
from harness.durations import format_duration
from harness.errors import UsageError, WorkerBootError
from harness.profile import Group, LoadedProfile
from harness.remote import LOST_EXIT_CODE, AgentLink, RemoteRun, has_simulator
from harness.simulator import registered_simulators
from harness.store import Store
from harness.worker import WORKER_BOOT_ERROR, WorkerSpec, worker_main

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT = 10.0
"""A worker silent for this long is killed and restarted."""
MAX_RESTARTS = 5
"""Restarts per worker slot before the group is given up."""
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass
class _Slot:
    """One worker position of a group; survives restarts of its process."""

    group: str
    index: int
    spec: WorkerSpec
    process: Any = None
    conn: Connection | None = None
    row_id: int | None = None
    last_seen: float = 0.0
    booted: bool = False
    boot_error: str | None = None
    restarts: int = 0
    restart_at: float | None = None
    done: bool = False
    stopping: bool = False
    finished: bool = False
    target: float = 0.0
    agent: AgentLink | None = None
    """The remote agent this slot's worker runs on (None: this machine)."""
    weight: float = 1.0
    """The slot's share of the group's load relative to the other slots (an agent's capacity)."""


@dataclass
class _GroupState:
    name: str
    config: Group
    slots: list[_Slot] = field(default_factory=list)
    started: bool = False
    finished: bool = False
    current: float = 0.0
    target: float = 0.0
    users_max: float = 0.0
    last_scaled_event: float = 0.0
    last_reported: float = -1.0
    manual: float | None = None


def prepare_forkserver(loaded: LoadedProfile) -> None:
    """Import the worker and the profile's simulators once in the forkserver, not in every worker."""
    modules = ["harness.worker", "harness.targets.runner"]
    for group in loaded.profile.groups.values():
        spec = registered_simulators().get(group.simulator) or group.simulator
        module = spec.partition(":")[0]
        if module and module not in modules:
            modules.append(module)
    multiprocessing.get_context("forkserver").set_forkserver_preload(modules)


class Supervisor:
    """Owns the worker processes of one run."""

    def __init__(
        self,
        run_id: str,
        loaded: LoadedProfile,
        targets: dict[str, str],
        collector: Collector,
        store: Store,
        run_dir: str,
        log_level: int = logging.INFO,
        remote: RemoteRun | None = None,
    ) -> None:
        self.run_id = run_id
        self.profile = loaded.profile
        self.loaded = loaded
        self.targets = targets
        self.collector = collector
        self.store = store
        self.run_dir = run_dir
        self.log_level = log_level
        self.ctx = multiprocessing.get_context("forkserver")
        self.groups = {name: _GroupState(name, cfg) for name, cfg in self.profile.groups.items()}
        self.started_at = 0.0
        self.fatal: str | None = None
        self.fatal_is_bad_input = False
        """True when `fatal` comes from bad input (a missing file, rejected credentials): exit 2, not 3."""
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._closing = False
        self._conns: dict[Connection, _Slot] = {}
        self.prepared: dict[str, Any] = {}
        """Each group's `prepare_run` result, handed to its workers."""
        self.remote = remote
        """The run's agents, when its profile has `agents:` (remote slots relay through them)."""
        if remote is not None:
            remote.dispatch = self._dispatch
        collector.group_state = self.group_state

    # -- start -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Run each group's `Simulator.prepare_run` once; sets `fatal` with the reason if one fails."""
        from harness.simulator import load_simulator

        for name, group in self.profile.groups.items():
            cls = load_simulator(group.simulator)
            options = self.loaded.options.get(name) or cls.Options.model_validate(group.options)
            began = time.time()
            try:
                self.prepared[name] = cls.prepare_run(
                    options, self.targets, self.run_id, logging.getLogger(f"harness.prepare.{name}")
                )
            except UsageError as exc:
                self.fatal = f"group {name!r}: {exc}"
                self.fatal_is_bad_input = True
                return
            except Exception as exc:
                self.fatal = f"group {name!r}: preparing the run failed: {type(exc).__name__}: {exc}"
                return
            if self.prepared[name] is not None:
                self.collector.event("group_prepared", name, seconds=round(time.time() - began, 3))

    def finish(self) -> None:
        """Run each prepared group's `Simulator.finish_run` and keep the data points it returns."""
        from harness.simulator import load_simulator

        for name, prepared in list(self.prepared.items()):
            log = logging.getLogger(f"harness.finish.{name}")
            try:
                cls = load_simulator(self.profile.groups[name].simulator)
                points = cls.finish_run(prepared, self.run_id, log)
            except Exception as exc:  # a plugin's failure is logged and isolated
                log.error("group %r: finishing the run failed: %s: %s", name, type(exc).__name__, exc)
                continue
            now = time.time()
            batch = [
                {"t": p.get("t", now), "entity": p["entity"], "values": p["values"]} for p in points or []
            ]
            if batch:
                self.collector.submit(name, -1, {"datapoints": batch})

    def start(self) -> None:
        """Start the pipe reader; groups start on their first tick after their start_delay."""
        self.started_at = time.time()
        self._reader = threading.Thread(target=self._read_loop, name="supervisor-reader", daemon=True)
        self._reader.start()

    def _spec(self, name: str, group: Group, index: int, workers: int | None = None) -> WorkerSpec:
        workers = workers or group.processes
        total = group.total_iterations
        share = None
        if total is not None:
            share = total // workers + (1 if index < total % workers else 0)
        return WorkerSpec(
            run_id=self.run_id,
            group=name,
            index=index,
            workers=workers,
            simulator=group.simulator,
            options=self.loaded.options[name].model_dump(by_alias=True)
            if name in self.loaded.options
            else group.options,
            mode=group.mode,
            targets=self.targets,
            run_dir=self.run_dir,
            seed=self.profile.seed,
            think_time=group.think_time.model_dump(by_alias=True),
            arrival=group.arrival,
            max_in_flight=max(1, math.ceil(group.max_in_flight / workers)),
            iterations=group.iterations,
            total_iterations=share,
            log_level=self.log_level,
            secrets=sorted(self.loaded.secrets),
            prepared=self.prepared.get(name),
        )

    def _start_group(self, state: _GroupState) -> None:
        state.started = True
        # with agents, `processes` workers on each agent that has the simulator (and here if `local`)
        where: list[AgentLink | None] = [None]
        if self.remote is not None:
            where = self.remote.placements(state.name, state.config.simulator)
        places = [place for place in where for _ in range(state.config.processes)]
        for index, place in enumerate(places):
            if state.config.total_iterations is not None and index >= state.config.total_iterations:
                break
            slot = _Slot(state.name, index, self._spec(state.name, state.config, index, len(places)))
            slot.agent = place
            if self.remote is not None:
                slot.weight = place.weight if place is not None else float(os.cpu_count() or 1)
            state.slots.append(slot)
            self._launch(slot)
        self.collector.event(
            "group_started",
            state.name,
            simulator=state.config.simulator,
            processes=len(state.slots),
            mode=state.config.mode,
        )

    def _launch(self, slot: _Slot) -> None:
        if slot.agent is not None:
            self._launch_remote(slot, slot.agent)
            return
        parent, child = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(
            target=worker_main,
            args=(slot.spec, child),
            name=f"harness-worker-{slot.spec.label}",
            daemon=False,
        )
        process.start()
        child.close()
        with self._lock:
            slot.process, slot.conn = process, parent
            slot.last_seen = time.time()
            slot.booted = False
            slot.done = slot.finished = False
            self._conns[parent] = slot
        slot.row_id = self.store.add_worker(self.run_id, slot.group, slot.index, process.pid, slot.restarts)
        self.collector.event(
            "worker_started" if slot.restarts == 0 else "worker_restarted",
            slot.group,
            worker=slot.index,
            pid=process.pid,
            restarts=slot.restarts,
        )
        if slot.target:
            self._send(slot, "set", {"target": slot.target})

    def _launch_remote(self, slot: _Slot, agent: AgentLink) -> None:
        assert self.remote is not None
        with self._lock:
            slot.last_seen = time.time()
            slot.booted = False
            slot.done = slot.finished = False
        self.remote.launch(agent, slot, slot.spec)  # sets slot.process and slot.conn to its proxies
        slot.row_id = self.store.add_worker(self.run_id, slot.group, slot.index, None, slot.restarts)
        self.collector.event(
            "worker_started" if slot.restarts == 0 else "worker_restarted",
            slot.group,
            worker=slot.index,
            pid=None,
            restarts=slot.restarts,
            agent=agent.name,
        )
        if slot.target:
            self._send(slot, "set", {"target": slot.target})

    # -- pipe reader -----------------------------------------------------------------------
    def _read_loop(self) -> None:
        while not self._closing:
            with self._lock:
                conns = list(self._conns)
            if not conns:
                time.sleep(0.05)
                continue
            for ready in wait(conns, timeout=0.2):
                conn = cast(Connection, ready)
                with self._lock:
                    slot = self._conns.get(conn)
                if slot is None:
                    continue
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    with self._lock:
                        self._conns.pop(conn, None)
                    continue
                slot.last_seen = time.time()
                self._dispatch(slot, kind, payload)

    def _dispatch(self, slot: _Slot, kind: str, payload: Any) -> None:
        if kind == "batch":
            self.collector.submit(slot.group, slot.index, payload)
        elif kind == "log":
            record = logging.LogRecord(
                payload["logger"],
                payload["level"],
                "worker",
                0,
                "[%s] %s",
                (payload["worker"], payload["message"]),
                None,
            )
            record.created = payload["t"]
            logging.getLogger(payload["logger"]).handle(record)
        elif kind == "hello":
            slot.booted = True
        elif kind == "boot_error":
            slot.boot_error = payload["message"]
        elif kind == "done":
            slot.done = True
        elif kind == "bye":
            pass

    def _send(self, slot: _Slot, kind: str, payload: dict[str, Any]) -> None:
        if slot.conn is None:
            return
        try:
            slot.conn.send((kind, payload))
        except (OSError, BrokenPipeError, EOFError, ValueError):
            pass

    # -- the once-a-second decisions -------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Apply shapes, reap dead workers, restart or give up; sets `self.fatal` on a boot error."""
        now = time.time() if now is None else now
        if self.fatal:
            return
        if self.remote is not None:
            self._follow_agents(now)
            if self.fatal:
                return
        elapsed = now - self.started_at
        for state in self.groups.values():
            if state.finished:
                continue
            t = elapsed - state.config.start_delay
            if t < 0:
                continue
            if not state.started:
                self._start_group(state)
            self._reap(state, now)
            if self.fatal:
                return
            self._shape(state, t, now)

    def _shape(self, state: _GroupState, t: float, now: float) -> None:
        group = state.config
        if state.slots and all(s.done or s.finished for s in state.slots):
            self._finish_group(state, "iterations done")
            return
        if state.manual is not None:
            point_target, spawn = state.manual, None
        else:
            try:
                point = group.shape.at(t, group.base)
            except Exception as exc:  # a user's shape function: stop the run with its message
                self.fatal = f"group {state.name!r}: the load shape failed at t={t:.0f}s: {exc!r}"
                return
            if point is None:
                self._finish_group(state, "shape finished")
                return
            point_target, spawn = point.target, point.spawn_rate
        spawn = spawn if spawn is not None else group.spawn_rate
        if group.mode == "closed" and spawn is not None and point_target > state.current:
            state.current = min(point_target, state.current + spawn)
        else:
            state.current = point_target
        state.target = point_target
        state.users_max = max(state.users_max, state.current)
        live = [s for s in state.slots if not s.finished]
        shares = _split(
            state.current, len(live), integer=group.mode == "closed", weights=[s.weight for s in live]
        )
        for slot, share in zip(live, shares, strict=True):
            if share != slot.target:
                slot.target = share
                self._send(slot, "set", {"target": share})
        rounded = round(state.current, 1)
        if rounded != state.last_reported and (now - state.last_scaled_event >= 5 or state.last_reported < 0):
            state.last_reported = rounded
            state.last_scaled_event = now
            unit = "users" if group.mode == "closed" else "rate"
            self.collector.event("scaled", state.name, **{unit: rounded, "target": round(point_target, 1)})

    def scale(self, group: str, value: float | None, who: str = "operator") -> None:
        """Override a group's shape with a fixed number of users or rate (None returns to the shape)."""
        state = self.groups[group]
        state.manual = value
        unit = "users" if state.config.mode == "closed" else "rate"
        self.collector.event("scaled_manually", group, value=value, unit=unit, who=who)
        log.info("group %s set to %s %s by %s", group, "its shape" if value is None else value, unit, who)

    def _reap(self, state: _GroupState, now: float) -> None:
        for slot in state.slots:
            if slot.finished or slot.process is None:
                continue
            if slot.agent is not None and slot.process.paused:
                continue  # its agent is out of reach: neither silent nor dead until it is lost
            code = slot.process.exitcode
            if code is None:
                if slot.booted and now - slot.last_seen > HEARTBEAT_TIMEOUT and not slot.stopping:
                    self.collector.event(
                        "worker_unresponsive",
                        slot.group,
                        worker=slot.index,
                        silent_s=round(now - slot.last_seen, 1),
                    )
                    log.warning(
                        "worker %s sent nothing for %.0fs: killing it", slot.spec.label, now - slot.last_seen
                    )
                    slot.process.kill()
                continue
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    slot.restart_at = None
                    self._launch(slot)
                continue
            self._exited(slot, code)
            if slot.boot_error or code == WORKER_BOOT_ERROR:
                message = slot.boot_error or "exited before it started"
                self.fatal = f"group {slot.group!r}: worker {slot.index} could not boot: {message}"
                slot.finished = True
                return
            if slot.done:
                slot.finished = True
                continue
            if slot.restarts >= MAX_RESTARTS:
                log.error("worker %s died %d times: giving up on it", slot.spec.label, slot.restarts + 1)
                self.collector.event("worker_given_up", slot.group, worker=slot.index, restarts=slot.restarts)
                slot.finished = True
                continue
            delay = BACKOFF[min(slot.restarts, len(BACKOFF) - 1)]
            slot.restarts += 1
            slot.restart_at = now + delay
            log.warning("worker %s exited (%s): restarting in %.0fs", slot.spec.label, _describe(code), delay)

    def _exited(self, slot: _Slot, code: int) -> None:
        with self._lock:
            if slot.conn is not None:
                self._conns.pop(slot.conn, None)
                slot.conn.close()
                slot.conn = None
        detail: dict[str, Any] = {"worker": slot.index, "pid": slot.process.pid, "exit_code": code}
        if code < 0:
            detail["signal"] = signal.Signals(-code).name
        self.collector.event("worker_exited", slot.group, **detail)
        self.collector.forget_worker(slot.group, slot.index)
        if slot.row_id is not None:
            self.store.end_worker(slot.row_id, code)

    def _follow_agents(self, now: float) -> None:
        """Agents that came back get their workers' targets again; lost ones fail or move (on_lost);
        new ones take a share (joining: grow)."""
        assert self.remote is not None
        for link in self.remote.newcomers(self.collector):
            self._grow(link)
        for change, link in self.remote.poll(self.collector, now):
            slots = [s for st in self.groups.values() for s in st.slots if s.agent is link and not s.finished]
            if change == "reconnected":
                for slot in slots:
                    slot.last_seen = now
                    if slot.target:
                        self._send(slot, "set", {"target": slot.target})
                continue
            away = format_duration(self.remote.settings.lost_timeout)
            if self.remote.settings.on_lost == "fail":
                self.fatal = f"agent {link.name!r} was lost (away for more than {away})"
                return
            simulators = {self.groups[slot.group].config.simulator for slot in slots}
            spare = None
            if slots and not any(s.stopping for s in slots):  # (a draining run starts no workers)
                spare = self.remote.replacement(link, simulators, self.collector)
            if spare is not None:  # move: an agent that came during the run takes the workers over
                for slot in slots:
                    if slot.row_id is not None:
                        self.store.end_worker(slot.row_id, LOST_EXIT_CODE)
                    slot.agent, slot.weight = spare, spare.weight
                    slot.restarts += 1
                    self._launch(slot)
                workers = "1 worker" if len(slots) == 1 else f"{len(slots)} workers"
                log.warning(
                    "agent %s lost (away for %s): %s moved to agent %s", link.name, away, workers, spare.name
                )
                continue
            for slot in slots:  # move: its share goes to the remaining slots of the group
                slot.finished = True
                if slot.row_id is not None:
                    self.store.end_worker(slot.row_id, LOST_EXIT_CODE)
                self.collector.forget_worker(slot.group, slot.index)
            for state in self.groups.values():
                if state.started and not state.finished and all(s.finished for s in state.slots):
                    self.fatal = f"group {state.name!r}: no workers left after agent {link.name!r} was lost"
                    return
            moved = "it ran no workers of this run"
            if slots:
                moved = "1 worker's share" if len(slots) == 1 else f"{len(slots)} workers' shares"
                moved += " moved to the others"
            log.warning("agent %s lost (away for %s): %s", link.name, away, moved)

    def _grow(self, link: AgentLink) -> None:
        """`processes` more workers on an agent that joined mid-run, for each running group it can run;
        the next second's split gives them their share."""
        added = []
        for state in self.groups.values():
            group = state.config
            if not state.started or state.finished or group.total_iterations is not None:
                continue  # a group that starts later places its workers on every agent then
            if any(s.stopping for s in state.slots) or not has_simulator(link.info.capacity, group.simulator):
                continue
            for _ in range(group.processes):
                live = sum(1 for s in state.slots if not s.finished)
                index = len(state.slots)
                slot = _Slot(state.name, index, self._spec(state.name, group, index, live + 1))
                slot.agent, slot.weight = link, link.weight
                state.slots.append(slot)
                self._launch(slot)
            added.append(f"{group.processes} worker{'s' if group.processes > 1 else ''} of {state.name}")
        what = ", ".join(added) if added else "no running group to grow"
        log.info("agent %s joined the run: %s", link.name, what)

    def _finish_group(self, state: _GroupState, reason: str) -> None:
        state.finished = True
        self.collector.event("group_finished", state.name, reason=reason)
        for slot in state.slots:
            slot.stopping = True
            self._send(slot, "stop", {"grace": self.profile.stop_grace})

    # -- state for views -------------------------------------------------------------------
    @property
    def all_finished(self) -> bool:
        """True once every group has finished (its shape ended or its iterations are done)."""
        return all(state.finished for state in self.groups.values())

    def group_state(self) -> dict[str, dict[str, Any]]:
        """Per group: mode, target, workers and state, for the live view."""
        out = {}
        for name, state in self.groups.items():
            status = "done" if state.finished else ("running" if state.started else "waiting")
            out[name] = {
                "mode": state.config.mode,
                "target": round(state.current) if state.config.mode == "closed" else round(state.current, 2),
                "workers": sum(
                    1 for s in state.slots if s.process is not None and s.process.exitcode is None
                ),
                "state": status,
                "simulator": state.config.simulator,
            }
        return out

    def users_max(self) -> dict[str, float]:
        """The highest users (or rate) each group reached."""
        return {name: state.users_max for name, state in self.groups.items()}

    # -- stop ------------------------------------------------------------------------------
    def stop(self, grace: float, immediate: bool = False, hurry: Any = None) -> None:
        """Ask every worker to finish in-flight work within `grace`, then terminate, then kill.

        `hurry()` returning True (a second Ctrl-C) cuts the grace period short.
        """
        slots = [s for st in self.groups.values() for s in st.slots if s.process is not None]
        if not immediate:
            for slot in slots:
                if slot.process.exitcode is None:
                    slot.stopping = True
                    self._send(slot, "stop", {"grace": grace})
            deadline = time.time() + grace + 5.0
            while time.time() < deadline and any(s.process.exitcode is None for s in slots):
                if hurry is not None and hurry():
                    log.warning("second interrupt: terminating workers now")
                    break
                time.sleep(0.05)
        for slot in slots:
            if slot.process.exitcode is None:
                slot.process.terminate()
        deadline = time.time() + 3.0
        while time.time() < deadline and any(s.process.exitcode is None for s in slots):
            time.sleep(0.05)
        for slot in slots:
            if slot.process.exitcode is None:
                slot.process.kill()
            slot.process.join(timeout=2.0)
        # give the reader a moment to drain the last batches before closing pipes
        time.sleep(0.3)
        self._closing = True
        if self._reader is not None:
            self._reader.join(timeout=2.0)
        for slot in slots:
            if slot.conn is not None:
                self._drain(slot)
            if slot.row_id is not None and not slot.finished:
                self.store.end_worker(slot.row_id, slot.process.exitcode)
            if slot.conn is not None:
                slot.conn.close()
                slot.conn = None
            slot.process.close()
            slot.process = None

    def _drain(self, slot: _Slot) -> None:
        assert slot.conn is not None
        try:
            while slot.conn.poll(0):
                kind, payload = slot.conn.recv()
                self._dispatch(slot, kind, payload)
        except (EOFError, OSError):
            pass


def _split(total: float, parts: int, integer: bool, weights: list[float] | None = None) -> list[float]:
    """Split users (whole numbers) or a rate across workers, in proportion to `weights` if given."""
    if parts <= 0:
        return []
    if weights is not None and len(set(weights)) > 1:
        return _split_weighted(total, weights, integer)
    if not integer:
        return [total / parts] * parts
    whole = int(round(total))
    return [float(whole // parts + (1 if i < whole % parts else 0)) for i in range(parts)]


def _split_weighted(total: float, weights: list[float], integer: bool) -> list[float]:
    """Shares proportional to `weights`; whole users by largest remainder (ties to the first)."""
    wsum = sum(weights)
    exact = [total * w / wsum for w in weights]
    if not integer:
        return exact
    whole = int(round(total))
    exact = [whole * w / wsum for w in weights]
    shares = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))
    for i in order[: whole - sum(shares)]:
        shares[i] += 1
    return [float(s) for s in shares]


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


__all__ = ["Supervisor", "WorkerBootError"]
