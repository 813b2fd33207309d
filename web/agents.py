"""The agents hub: the panel's Socket.IO namespace `/agents`, where `harness agent` processes connect.

Agent → hub: `hello` (with ack: the hub answers `{ack: last seq it has}`), `clock` (with ack: `{t}`,
the hub's time), `msg` {seq, run_id, group, index, kind, payload} (a relayed worker pipe message or
`exited`), `status` {clock_offset_s, workers, outbox, dropped, cpu_percent, rss_mb}.
Hub → agent: `launch`, `send`, `signal`, `end_run`, `ack` {seq} (cumulative).

Messages are numbered per agent. The hub passes them on in `seq` order exactly once: a duplicate
(`seq` <= the last one passed on, e.g. resent after a reconnect) is dropped; one that arrives early
(Socket.IO handles each event in its own thread) waits for the ones before it; a gap that stays open
for `GAP_WAIT` seconds (messages the agent had to drop from a full outbox) is skipped.

An agent authenticates with the panel's token (`auth={"token": ...}`); without a configured token only
a loopback-bound panel accepts agents (the same rule as the panel itself).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask import current_app, request
from socketio.exceptions import ConnectionRefusedError  # its message (not builtins') reaches the client

from harness.remote import AgentInfo
from web.extensions import socketio
from web.security import configured_token, served_on_loopback, token_matches

if TYPE_CHECKING:
    from harness.profile import Agents
    from harness.remote import RemoteRun

log = logging.getLogger(__name__)

NAMESPACE = "/agents"
SILENT_AFTER = 3.5
"""A connected agent heard nothing from for this long is out of reach: it sends `status` every second
(and batches while it runs workers), so a silent link cut is noticed within 2.5-3.5 s. Socket.IO's own
heartbeat (ping every 25 s, 20 s to answer) is left as it is, for the panel's browsers and so that a
short cut does not close the connection: the link coming back resumes it where it was."""
ACK_EVERY = 0.5
"""Seconds between cumulative acks (sooner after `ACK_COUNT` messages)."""
ACK_COUNT = 200
GAP_WAIT = 1.0
"""Seconds a message waits for a missing earlier one before the gap is skipped."""
FORGET_AFTER = 600.0
"""A disconnected agent that no run holds is forgotten after this long."""


@dataclass
class AgentRecord:
    """One agent process the hub knows (by its `agent_id`, stable across reconnects)."""

    agent_id: str
    name: str
    labels: list[str] = field(default_factory=list)
    capacity: dict[str, Any] = field(default_factory=dict)
    clock_offset_s: float = 0.0
    sid: str | None = None
    connected_at: float = 0.0
    disconnected_at: float | None = None
    last_heard: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, Any] = field(default_factory=dict)
    """What the agent said it runs, in its last `hello`."""
    run_id: str | None = None
    """The run that took this agent, if one did."""
    last_seq: int = 0
    """The last message passed on, in order."""
    acked: int = 0
    acked_at: float = 0.0
    held: dict[int, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    duplicates: int = 0
    skipped: int = 0
    cseq: int = 1
    """The number of the next command to the agent (it runs them in this order)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    out_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reachable(self, now: float) -> bool:
        """Connected, and heard from within `SILENT_AFTER` seconds."""
        return self.sid is not None and now - self.last_heard < SILENT_AFTER

    def health(self, now: float) -> str:
        """ok | silent | disconnected"""
        if self.sid is None:
            return "disconnected"
        return "ok" if self.reachable(now) else "silent"

    def view(self, now: float) -> dict[str, Any]:
        """The agent for `GET /api/agents`."""
        return {
            "agent": self.agent_id,
            "name": self.name,
            "labels": self.labels,
            "capacity": self.capacity,
            "clock_offset_s": round(self.clock_offset_s, 4),
            "health": self.health(now),
            "connected_at": self.connected_at,
            "disconnected_at": self.disconnected_at,
            "last_heard_s": round(now - self.last_heard, 1) if self.last_heard else None,
            "run_id": self.run_id,
            "state": "idle" if self.run_id is None else "running",
            "slots": sum(len(v) for v in self.runs.values() if isinstance(v, list)),
            "workers": self.status.get("workers", 0),
            "outbox": self.status.get("outbox", 0),
            "dropped": self.status.get("dropped", 0),
            "cpu_percent": self.status.get("cpu_percent"),
            "rss_mb": self.status.get("rss_mb"),
        }


class AgentHub:
    """Connected agents, which run holds which, and the ordered, de-duplicated relay of their messages."""

    def __init__(self, server: Any, bind_host: str | None = None) -> None:
        self._server = server
        """The Socket.IO server agents connect to (`emit` and `disconnect` go through it)."""
        self._bind_host = bind_host or "127.0.0.1"
        self.agents: dict[str, AgentRecord] = {}
        self._sids: dict[str, str] = {}
        self._runs: dict[str, RemoteRun] = {}
        self._ended: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._loop: threading.Thread | None = None

    @property
    def bind_host(self) -> str:
        """The address the panel (and so the hub) is served on; 127.0.0.1 when not known (gunicorn)."""
        return self._bind_host

    # -- the socket side ---------------------------------------------------------------------
    def hello(self, sid: str, data: dict[str, Any]) -> dict[str, Any]:
        """An agent (re)introduced itself on connection `sid`; answers the last seq the hub has."""
        now = time.time()
        agent_id = str(data.get("agent_id") or sid)
        with self._changed:
            record = self.agents.get(agent_id)
            if record is None:
                record = self.agents[agent_id] = AgentRecord(agent_id, str(data.get("name") or agent_id))
                record.last_seq = record.acked = max(0, int(data.get("first_seq", 1)) - 1)
            record.name = str(data.get("name") or record.name)
            record.labels = [str(x) for x in data.get("labels") or []]
            record.capacity = dict(data.get("capacity") or {})
            record.clock_offset_s = float(data.get("clock_offset_s") or 0.0)
            record.runs = dict(data.get("runs") or {})
            record.sid, record.connected_at, record.last_heard = sid, now, now
            record.disconnected_at = None
            self._sids[sid] = agent_id
            with record.lock:
                # messages the agent no longer has (dropped from a full outbox) are not waited for
                record.last_seq = max(record.last_seq, int(data.get("first_seq", 1)) - 1)
                record.acked, record.acked_at = record.last_seq, now
                ack = record.last_seq
            with record.out_lock:
                cseq = record.cseq
            busy = bool(self._runs)
            growing = any(
                r.settings.joining == "grow" and _matches(record, r.settings) for r in self._runs.values()
            )
            self._changed.notify_all()
            self._start_loop()
        # one line per change: a run that holds the agent says it came back itself
        if record.run_id is not None:
            log.debug("agent %s connected (%s)", record.name, agent_id)
        elif growing:
            log.info("agent %s connected: the run takes it (joining: grow)", record.name)
        elif busy:
            log.info(
                "agent %s connected: idle until the next run (a run takes its agents when it starts)",
                record.name,
            )
        else:
            log.info("agent %s connected (%s)", record.name, agent_id)
        return {"ack": ack, "cseq": cseq, "t": now}

    def disconnected(self, sid: str) -> None:
        """Connection `sid` closed (the agent may come back on another)."""
        with self._changed:
            agent_id = self._sids.pop(sid, None)
            record = self.agents.get(agent_id) if agent_id else None
            if record is not None and record.sid == sid:
                record.sid = None
                record.disconnected_at = time.time()
                level = logging.DEBUG if record.run_id else logging.INFO
                log.log(level, "agent %s disconnected", record.name)
            self._changed.notify_all()

    def _record(self, sid: str) -> AgentRecord | None:
        agent_id = self._sids.get(sid)
        record = self.agents.get(agent_id) if agent_id else None
        if record is not None:
            record.last_heard = time.time()
        return record

    def status(self, sid: str, data: dict[str, Any]) -> None:
        """An agent's periodic status."""
        record = self._record(sid)
        if record is not None and isinstance(data, dict):
            record.status = data
            if "clock_offset_s" in data:
                record.clock_offset_s = float(data["clock_offset_s"])
            if isinstance(data.get("runs"), dict):
                record.runs = data["runs"]

    def message(self, sid: str, data: dict[str, Any]) -> None:
        """One relayed message: passed on in seq order, once."""
        record = self._record(sid)
        if record is None or not isinstance(data, dict):
            return
        now = time.time()
        seq = int(data.get("seq", 0))
        with record.lock:
            if seq <= record.last_seq or seq in record.held:
                record.duplicates += 1
                return
            record.held[seq] = (now, data)
            self._pass_on(record, now)
            due = record.last_seq - record.acked >= ACK_COUNT
        if due:
            self._ack(record, now)

    def _pass_on(self, record: AgentRecord, now: float, skip_gaps: bool = False) -> None:
        """Pass on held messages in order (the caller holds `record.lock`)."""
        while record.held:
            following = record.last_seq + 1
            if following not in record.held:
                first = min(record.held)
                if not (skip_gaps and now - record.held[first][0] >= GAP_WAIT):
                    return
                record.skipped += first - following
                log.warning("agent %s: messages %d-%d never came", record.name, following, first - 1)
                following = first
            _, msg = record.held.pop(following)
            record.last_seq = following
            self._route(record, msg)

    def _route(self, record: AgentRecord, msg: dict[str, Any]) -> None:
        run_id = str(msg.get("run_id"))
        run = self._runs.get(run_id)
        if run is not None:
            try:
                run.deliver(record.agent_id, msg)
            except Exception:
                log.exception("agent %s: could not pass on a %s message", record.name, msg.get("kind"))
        elif (record.agent_id, run_id) not in self._ended and msg.get("kind") != "exited":
            # a run that is over (or unknown): whatever the agent still runs of it must stop
            self._ended.add((record.agent_id, run_id))
            self.emit(record.agent_id, "end_run", {"run_id": run_id})

    def _ack(self, record: AgentRecord, now: float) -> None:
        with record.lock:
            seq = record.last_seq
            if seq <= record.acked and now - record.acked_at < 5.0:
                return
            record.acked, record.acked_at = seq, now
        self.emit(record.agent_id, "ack", {"seq": seq})

    def _start_loop(self) -> None:
        if self._loop is None:
            self._loop = threading.Thread(target=self._housekeeping, name="agents-hub", daemon=True)
            self._loop.start()

    def _housekeeping(self) -> None:
        """Acks every `ACK_EVERY` s, skip gaps that stay open, forget long-gone agents."""
        while True:
            time.sleep(ACK_EVERY / 2)
            now = time.time()
            with self._lock:
                records = list(self.agents.values())
            for record in records:
                if record.held:
                    with record.lock:
                        self._pass_on(record, now, skip_gaps=True)
                if record.sid is not None and now - record.acked_at >= ACK_EVERY:
                    self._ack(record, now)
                if (
                    record.sid is None
                    and record.run_id is None
                    and now - (record.disconnected_at or now) > FORGET_AFTER
                ):
                    with self._lock:
                        self.agents.pop(record.agent_id, None)

    # -- the run side (harness.remote.Hub) ----------------------------------------------------
    def take(
        self, run_id: str, settings: Agents, timeout: float, cancelled: Callable[[], bool]
    ) -> tuple[list[AgentInfo], int]:
        """Wait up to `timeout` for `settings.min` free agents that match; take every one that does."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                now = time.time()
                free = [
                    r
                    for r in self.agents.values()
                    if r.reachable(now) and r.run_id is None and _matches(r, settings)
                ]
                if len(free) >= settings.min or cancelled():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return [], len(free)
                self._changed.wait(min(left, 0.5))
            if cancelled():
                return [], len(free)
            for record in free:
                record.run_id = run_id
            return [
                AgentInfo(r.agent_id, r.name, list(r.labels), dict(r.capacity), r.clock_offset_s)
                for r in free
            ], len(free)

    def idle(self, settings: Agents) -> list[AgentInfo]:
        """Reachable agents that match `settings` and that no run holds (e.g. connected mid-run)."""
        now = time.time()
        with self._lock:
            return [
                AgentInfo(r.agent_id, r.name, list(r.labels), dict(r.capacity), r.clock_offset_s)
                for r in self.agents.values()
                if r.reachable(now) and r.run_id is None and _matches(r, settings)
            ]

    def claim(self, run_id: str, agent_id: str) -> bool:
        """Take one idle agent for a run that is going (a lost agent's replacement); False if it is
        gone or another run took it meanwhile."""
        with self._lock:
            record = self.agents.get(agent_id)
            if record is None or record.run_id is not None or not record.reachable(time.time()):
                return False
            record.run_id = run_id
            return True

    def attach(self, run_id: str, run: RemoteRun) -> None:
        """Route the run's messages to it."""
        with self._lock:
            self._runs[run_id] = run

    def release(self, run_id: str) -> None:
        """The run is over: its agents are free."""
        with self._changed:
            self._runs.pop(run_id, None)
            for record in self.agents.values():
                if record.run_id == run_id:
                    record.run_id = None
            self._changed.notify_all()

    def emit(self, agent_id: str, event: str, data: dict[str, Any]) -> bool:
        """Send `event` to the agent; False if it is not connected."""
        record = self.agents.get(agent_id)
        if record is None or record.sid is None:
            return False
        try:
            if event == "ack":
                self._server.emit(event, data, to=record.sid, namespace=NAMESPACE)
                return True
            # commands are numbered: Socket.IO's client handles each message in its own thread, and
            # the agent runs them in this order (a `set` must not overtake the `launch` before it)
            with record.out_lock:
                data = {**data, "cseq": record.cseq}
                record.cseq += 1
                self._server.emit(event, data, to=record.sid, namespace=NAMESPACE)
        except Exception as exc:  # a connection closing under us: the agent is away
            log.debug("could not send %s to agent %s: %s", event, agent_id, exc)
            return False
        return True

    def reachable(self, agent_id: str) -> bool:
        """True while the agent is connected and not silent."""
        record = self.agents.get(agent_id)
        return record is not None and record.reachable(time.time())

    def disconnect(self, agent_id: str) -> None:
        """Close an agent's connection from this side (it reconnects by itself)."""
        record = self.agents.get(agent_id)
        if record is not None and record.sid is not None:
            self._server.disconnect(record.sid, namespace=NAMESPACE)

    def view(self) -> list[dict[str, Any]]:
        """Every known agent, connected ones first, by name."""
        now = time.time()
        with self._lock:
            records = list(self.agents.values())
        records.sort(key=lambda r: (r.sid is None, r.name))
        return [r.view(now) for r in records]


def _matches(record: AgentRecord, settings: Agents) -> bool:
    if settings.names and record.name not in settings.names:
        return False
    return not settings.labels or bool(set(settings.labels) & set(record.labels))


def get_hub() -> AgentHub:
    """The app's agents hub."""
    hub: AgentHub = current_app.extensions["harness_agents"]
    return hub


# -- Socket.IO handlers of the namespace ------------------------------------------------------------
@socketio.on("connect", namespace=NAMESPACE)
def on_connect(auth: Any = None) -> None:
    """An agent must present the panel's token (a loopback panel without a token accepts any)."""
    token = configured_token()
    if token is None:
        if not served_on_loopback(request.environ):
            raise ConnectionRefusedError("unauthorized")
        return
    given = auth.get("token") if isinstance(auth, dict) else None
    if not token_matches(given, token):
        raise ConnectionRefusedError("unauthorized")


@socketio.on("disconnect", namespace=NAMESPACE)
def on_disconnect(*_reason: Any) -> None:
    """The connection closed."""
    get_hub().disconnected(request.sid)  # type: ignore[attr-defined]


@socketio.on("hello", namespace=NAMESPACE)
def on_hello(data: Any) -> dict[str, Any]:
    """The agent's identity, capacity and clock offset; answers `{ack, t}`."""
    return get_hub().hello(request.sid, data if isinstance(data, dict) else {})  # type: ignore[attr-defined]


@socketio.on("clock", namespace=NAMESPACE)
def on_clock(_data: Any = None) -> dict[str, float]:
    """The hub's time, for the agent's clock-offset measurement."""
    return {"t": time.time()}


@socketio.on("msg", namespace=NAMESPACE)
def on_msg(data: Any) -> None:
    """One relayed worker message."""
    get_hub().message(request.sid, data)  # type: ignore[attr-defined]


@socketio.on("status", namespace=NAMESPACE)
def on_status(data: Any) -> None:
    """The agent's periodic status."""
    get_hub().status(request.sid, data)  # type: ignore[attr-defined]
