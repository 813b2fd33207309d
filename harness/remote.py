"""The controller's side of remote agents: which agents a run takes, and worker slots that live on them.

A remote slot's `process` and `conn` are proxies: `RemoteProcess` and `RemoteConn` turn the
supervisor's calls into messages to the agent (`launch`, `send`, `signal`), and the agent's relayed
pipe messages come back through `RemoteRun.deliver` into the supervisor's usual dispatch. So the
supervisor keeps all of its logic (shapes, heartbeats, restarts, stop) for local and remote workers.

The hub (the panel's Socket.IO namespace `/agents`, `web.agents.AgentHub`) is reached through the small
`Hub` protocol below, so nothing here imports the web package.

An agent's connection state, as a run sees it: `connected` → `disconnected` (its slots are paused: no
heartbeat check, no restart) → back to `connected` within `lost_timeout` (event `agent_reconnected`),
or `lost` after it (event `agent_lost`; the profile's `on_lost` policy decides).
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from harness.durations import format_duration
from harness.errors import AbortedError, UsageError

if TYPE_CHECKING:
    from harness.collector import Collector
    from harness.profile import Agents, LoadedProfile
    from harness.worker import WorkerSpec

log = logging.getLogger(__name__)

LOST_EXIT_CODE = -int(signal.SIGKILL)
"""The exit code recorded for a worker whose agent was lost (its real end is unknown)."""


@dataclass
class AgentInfo:
    """An agent as the hub knows it when a run takes it."""

    agent_id: str
    name: str
    labels: list[str]
    capacity: dict[str, Any]
    clock_offset_s: float = 0.0


class Hub(Protocol):
    """What a run needs from the agents hub (implemented by `web.agents.AgentHub`)."""

    def take(
        self, run_id: str, settings: Agents, timeout: float, cancelled: Callable[[], bool]
    ) -> tuple[list[AgentInfo], int]:
        """Wait up to `timeout` for `settings.min` free matching agents; take them all for `run_id`.

        Returns the agents taken (empty if too few came, or `cancelled()` became true) and how many
        matching agents were connected."""

    def idle(self, settings: Agents) -> list[AgentInfo]:
        """Reachable agents that match `settings` and that no run holds."""

    def claim(self, run_id: str, agent_id: str) -> bool:
        """Take one idle agent for a run that is going; False if it is gone or taken."""

    def attach(self, run_id: str, run: RemoteRun) -> None:
        """Route the run's relayed messages to `run.deliver`."""

    def release(self, run_id: str) -> None:
        """Forget the run: its agents are free again."""

    def emit(self, agent_id: str, event: str, data: dict[str, Any]) -> bool:
        """Send an event to a connected agent; False if it is not reachable now."""

    def reachable(self, agent_id: str) -> bool:
        """True while the agent is connected and was heard from recently."""

    @property
    def bind_host(self) -> str:
        """The address the hub is served on: embedded targets of a run on agents listen there too."""


BYTES_KEY = "$bytes"
"""`{"$bytes": text}`: bytes in a relayed message (ASCII as is — encoded histograms are —, else base64
after a `b64:` prefix)."""


def jsonable(value: Any) -> Any:
    """`value` as plain JSON: dicts, lists, str, numbers, bool and None; bytes become `{"$bytes": ...}`
    (`restore` turns them back).

    Nothing relayed between agent and hub is sent as a Socket.IO binary attachment: an attachment is a
    frame of its own after the event, and frames of a connection that arrive after its session closed
    (a link that comes back after a timeout) made the server decode a stray attachment as a packet.
    Plain JSON events of a closed session are simply ignored, and resent from the outbox.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if raw.isascii() and not raw.startswith(b"b64:"):
            return {BYTES_KEY: raw.decode("ascii")}
        return {BYTES_KEY: "b64:" + base64.b64encode(raw).decode("ascii")}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def restore(value: Any) -> Any:
    """The inverse of `jsonable` for bytes: every `{"$bytes": text}` back to bytes."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get(BYTES_KEY), str):
            text: str = value[BYTES_KEY]
            if text.startswith("b64:"):
                return base64.b64decode(text[4:])
            return text.encode("ascii")
        return {k: restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [restore(v) for v in value]
    return value


def has_simulator(capacity: dict[str, Any], simulator: str) -> bool:
    """True if an agent can run `simulator`: a registered name it reported, or any `module:Class`
    (the agent cannot list those; a missing module fails the worker's boot with the reason)."""
    return ":" in simulator or simulator in (capacity.get("simulators") or [])


class RemoteProcess:
    """Stands in for a worker process on an agent (the supervisor's `slot.process`)."""

    def __init__(self, link: AgentLink, group: str, index: int) -> None:
        self.link = link
        self.group = group
        self.index = index
        self.pid: int | None = None
        """The worker's pid on the agent, once its `hello` came."""
        self._exitcode: int | None = None
        self._ended = threading.Event()

    @property
    def exitcode(self) -> int | None:
        """None while running (or while its agent is out of reach), else the exit code."""
        return self._exitcode

    @property
    def paused(self) -> bool:
        """True while the agent is out of reach: no heartbeat check, no restart."""
        return self._exitcode is None and not self.link.reachable()

    def set_exit(self, code: int) -> None:
        """The agent reported the worker's exit (or the agent was lost)."""
        if self._exitcode is None:
            self._exitcode = code
            self._ended.set()

    def is_alive(self) -> bool:
        """True until the agent reports the exit."""
        return self._exitcode is None

    def terminate(self) -> None:
        """SIGTERM on the agent."""
        self._signal("term")

    def kill(self) -> None:
        """SIGKILL on the agent."""
        self._signal("kill")

    def _signal(self, sig: str) -> None:
        if self._exitcode is None:
            self.link.emit("signal", {"group": self.group, "index": self.index, "sig": sig})

    def join(self, timeout: float | None = None) -> None:
        """Wait for the exit report (not at all while the agent is out of reach)."""
        if not self.paused:
            self._ended.wait(timeout)

    def close(self) -> None:
        """Nothing to release locally."""


class RemoteConn:
    """Stands in for the worker's pipe (the supervisor's `slot.conn`): `send` goes to the agent."""

    def __init__(self, link: AgentLink, group: str, index: int) -> None:
        self.link, self.group, self.index = link, group, index

    def send(self, message: tuple[str, Any]) -> None:
        """Relay a control message (`set`, `stop`) to the worker; dropped while the agent is away
        (the supervisor sends the current target again when it is back)."""
        kind, payload = message
        data = {"group": self.group, "index": self.index, "kind": kind, "payload": jsonable(payload)}
        self.link.emit("send", data)

    def poll(self, timeout: float = 0.0) -> bool:
        """Nothing is ever buffered here: relayed messages are dispatched as they arrive."""
        return False

    def close(self) -> None:
        """Nothing to release locally."""


@dataclass
class AgentLink:
    """One agent taken by a run."""

    info: AgentInfo
    run: RemoteRun
    state: str = "connected"
    """connected | disconnected | lost"""
    since: float = field(default_factory=time.time)
    ended: bool = False
    """True once `end_run` was sent after the agent was lost (it came back too late)."""
    unsent: list[dict[str, Any]] = field(default_factory=list)
    """Launches that could not be sent while the agent was away; sent again when it is back."""

    @property
    def agent_id(self) -> str:
        """The agent's id (stable for the agent process's life)."""
        return self.info.agent_id

    @property
    def name(self) -> str:
        """The agent's name."""
        return self.info.name

    @property
    def weight(self) -> float:
        """How much of a group's load each of this agent's slots takes, relative to the others."""
        return float(self.info.capacity.get("processes") or self.info.capacity.get("cores") or 1)

    def reachable(self) -> bool:
        """True while the hub can talk to the agent."""
        return self.state != "lost" and self.run.hub.reachable(self.agent_id)

    def emit(self, event: str, data: dict[str, Any]) -> bool:
        """Send an event about this run to the agent."""
        if self.state == "lost":
            return False
        return self.run.hub.emit(self.agent_id, event, {"run_id": self.run.run_id, **data})


def _agent_event(collector: Collector, kind: str, info: AgentInfo, **detail: Any) -> None:
    """An event about an agent (`agent_joined`, `agent_idle`): who it is and what it offers."""
    collector.event(
        kind,
        None,
        agent=info.agent_id,
        name=info.name,
        cores=info.capacity.get("cores"),
        processes=info.capacity.get("processes"),
        **detail,
    )


def _joined(collector: Collector, info: AgentInfo, **detail: Any) -> None:
    """The `agent_joined` event of an agent a run takes."""
    _agent_event(collector, "agent_joined", info, clock_offset_s=round(info.clock_offset_s, 4), **detail)


class RemoteRun:
    """One run's agents: placement, launches, relayed messages, and connection changes."""

    def __init__(self, hub: Hub, run_id: str, settings: Agents) -> None:
        self.hub = hub
        self.run_id = run_id
        self.settings = settings
        self.links: dict[str, AgentLink] = {}
        self.dispatch: Callable[[Any, str, Any], None] | None = None
        """The supervisor's handler for one relayed message of a slot: (slot, kind, payload)."""
        self._slots: dict[tuple[str, str, int], tuple[Any, RemoteProcess]] = {}
        self._lock = threading.Lock()
        self._idle_seen: set[str] = set()
        """Agents that connected after the run took its agents (each is reported once)."""
        self.controller_targets: list[str] = []
        """Embedded targets (they run beside the controller): each agent reaches them at the address it
        reaches the hub on, so their URLs are rewritten by the agent (see `harness.agent`)."""

    # -- taking agents -----------------------------------------------------------------------
    @classmethod
    def take(
        cls, hub: Any, run_id: str, loaded: LoadedProfile, cancelled: Callable[[], bool] = lambda: False
    ) -> RemoteRun:
        """Wait for the profile's agents and check every group can be placed; UsageError if not
        (AbortedError if `cancelled()` turns true while waiting)."""
        settings = loaded.profile.agents
        assert settings is not None
        if hub is None:
            raise UsageError(
                "this profile runs on agents (agents:): start it with `harness start`, which serves "
                "the hub agents connect to"
            )
        run = cls(hub, run_id, settings)
        if settings.min > 0:
            log.info(
                "waiting up to %s for %d agent%s",
                format_duration(settings.wait),
                settings.min,
                "" if settings.min == 1 else "s",
            )
        agents, connected = hub.take(run_id, settings, settings.wait, cancelled)
        if cancelled():
            hub.release(run_id)
            raise AbortedError(f"stopped while waiting for agents ({connected} of {settings.min} connected)")
        if settings.min > 0 and not agents:
            which = ""
            if settings.names:
                which += f" named {', '.join(settings.names)}"
            if settings.labels:
                which += f" labelled {', '.join(settings.labels)}"
            raise UsageError(
                f"profile needs {settings.min} agent{'' if settings.min == 1 else 's'}{which}, "
                f"{connected} connected after {format_duration(settings.wait)}"
            )
        run.links = {a.agent_id: AgentLink(a, run) for a in agents}
        try:
            for group_name, group in loaded.profile.groups.items():
                if not run.placements(group_name, group.simulator):
                    have = "; ".join(
                        f"{a.name}: {', '.join(a.capacity.get('simulators') or []) or 'none'}" for a in agents
                    )
                    raise UsageError(
                        f"group {group_name!r}: no agent has simulator {group.simulator!r} ({have})"
                    )
        except BaseException:
            hub.release(run_id)
            raise
        hub.attach(run_id, run)
        return run

    def placements(self, group: str, simulator: str) -> list[AgentLink | None]:
        """Where a group's workers go: each agent that has its simulator, and None (the controller
        itself) when the profile says `local: true`."""
        where: list[AgentLink | None] = [
            link for link in self.links.values() if has_simulator(link.info.capacity, simulator)
        ]
        if self.settings.local:
            where.append(None)
        return where

    def announce(self, collector: Collector) -> None:
        """`agent_joined` events for the agents this run took."""
        for link in self.links.values():
            _joined(collector, link.info)

    # -- slots ---------------------------------------------------------------------------------
    def launch(self, link: AgentLink, slot: Any, spec: WorkerSpec) -> tuple[RemoteProcess, RemoteConn]:
        """Start `slot`'s worker on the agent; returns the proxies for `slot.process` and `slot.conn`."""
        process = RemoteProcess(link, slot.group, slot.index)
        conn = RemoteConn(link, slot.group, slot.index)
        with self._lock:
            self._slots[(link.agent_id, slot.group, slot.index)] = (slot, process)
            slot.process, slot.conn = process, conn  # before the agent can answer
        data = {
            "group": slot.group,
            "index": slot.index,
            "spec": jsonable(asdict(spec)),
            "controller_targets": self.controller_targets,
        }
        if not link.emit("launch", data):
            link.unsent.append(data)
        return process, conn

    def deliver(self, agent_id: str, msg: dict[str, Any]) -> None:
        """One relayed message from an agent (called by the hub, in order, once per seq)."""
        with self._lock:
            entry = self._slots.get((agent_id, str(msg.get("group")), int(msg.get("index") or 0)))
        link = self.links.get(agent_id)
        if entry is None or link is None or link.state == "lost":
            return
        slot, process = entry
        if slot.process is not process:
            return  # a message of an incarnation the supervisor has already replaced
        kind, payload = str(msg.get("kind")), restore(msg.get("payload"))
        slot.last_seen = time.time()
        if kind == "exited":
            process.set_exit(int((payload or {}).get("code", 1)))
            return
        if kind == "hello" and isinstance(payload, dict):
            process.pid = payload.get("pid")
        if self.dispatch is not None:
            self.dispatch(slot, kind, payload)

    def slots_of(self, agent_id: str) -> list[Any]:
        """The supervisor's slots placed on an agent."""
        with self._lock:
            return [slot for (aid, *_), (slot, _p) in self._slots.items() if aid == agent_id]

    # -- connection changes (the supervisor's tick calls `poll`) ---------------------------------
    def poll(self, collector: Collector, now: float) -> list[tuple[str, AgentLink]]:
        """Follow each agent's connection; returns the changes: ("reconnected" | "lost", link)."""
        changes: list[tuple[str, AgentLink]] = []
        for link in list(self.links.values()):
            reachable = self.hub.reachable(link.agent_id)
            detail: dict[str, Any] = {"agent": link.agent_id, "name": link.name}
            if link.state == "connected" and not reachable:
                link.state, link.since = "disconnected", now
                collector.event("agent_disconnected", None, **detail)
                log.warning("agent %s disconnected: its workers are paused", link.name)
            elif link.state == "disconnected" and reachable:
                away = now - link.since
                link.state, link.since = "connected", now
                collector.event("agent_reconnected", None, away_s=round(away, 1), **detail)
                log.info("agent %s reconnected", link.name)
                for data in link.unsent:
                    link.emit("launch", data)
                link.unsent.clear()
                changes.append(("reconnected", link))
            elif link.state == "disconnected" and now - link.since >= self.settings.lost_timeout:
                link.state, link.since = "lost", now
                for _slot, process in self._processes(link.agent_id):
                    process.set_exit(LOST_EXIT_CODE)
                collector.event(
                    "agent_lost",
                    None,
                    policy=self.settings.on_lost,
                    after_s=self.settings.lost_timeout,
                    **detail,
                )
                changes.append(("lost", link))  # the supervisor says what happens (one line)
            elif link.state == "lost" and reachable and not link.ended:
                link.ended = True  # it came back too late: whatever it still runs of this run must stop
                self.hub.emit(link.agent_id, "end_run", {"run_id": self.run_id})
        self._note_idle(collector)
        return changes

    def newcomers(self, collector: Collector) -> list[AgentLink]:
        """With `joining: grow`, the matching idle agents, taken for this run (event `agent_joined`
        with `mid_run`); the supervisor gives them workers."""
        if self.settings.joining != "grow":
            return []
        taken = [self._take(info, collector, mid_run=True) for info in self.hub.idle(self.settings)]
        return [link for link in taken if link is not None]

    def _take(self, info: AgentInfo, collector: Collector, **detail: Any) -> AgentLink | None:
        """Claim an idle agent for this run mid-run (event `agent_joined` with `detail`); None if it is
        ours already, gone, or another run took it."""
        if info.agent_id in self.links or not self.hub.claim(self.run_id, info.agent_id):
            return None
        link = self.links[info.agent_id] = AgentLink(info, self)
        _joined(collector, info, **detail)
        return link

    def _note_idle(self, collector: Collector) -> None:
        """An event for each matching agent that connected after the run started: it stays idle (a
        run takes its agents when it starts; the next run of the hub takes it). The hub logs the line."""
        for info in self.hub.idle(self.settings):
            if info.agent_id in self._idle_seen or info.agent_id in self.links:
                continue
            self._idle_seen.add(info.agent_id)
            _agent_event(collector, "agent_idle", info)

    def replacement(self, lost: AgentLink, simulators: set[str], collector: Collector) -> AgentLink | None:
        """An idle agent that matches and has every one of `simulators`, taken for this run to run a
        lost agent's workers (event `agent_joined` with `replaces`); None if there is none."""
        for info in self.hub.idle(self.settings):
            if all(has_simulator(info.capacity, s) for s in simulators):
                link = self._take(info, collector, replaces=lost.name)
                if link is not None:
                    return link
        return None

    def _processes(self, agent_id: str) -> list[tuple[Any, RemoteProcess]]:
        with self._lock:
            return [entry for (aid, *_), entry in self._slots.items() if aid == agent_id]

    def end(self) -> None:
        """The run is over: agents kill whatever is left of it, and are free for another run."""
        for link in self.links.values():
            self.hub.emit(link.agent_id, "end_run", {"run_id": self.run_id})
        self.hub.release(self.run_id)

    def view(self) -> list[dict[str, Any]]:
        """The run's agents and their state (for the live view and the panel)."""
        return [
            {"agent": link.agent_id, "name": link.name, "state": link.state, "slots": len(self.slots_of(aid))}
            for aid, link in self.links.items()
        ]


__all__ = [
    "AgentInfo",
    "Hub",
    "RemoteConn",
    "RemoteProcess",
    "RemoteRun",
    "has_simulator",
    "jsonable",
    "restore",
]
