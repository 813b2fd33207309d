"""`harness agent`: runs workers for a controller on another machine.

The agent connects to the controller's hub (the panel's Socket.IO namespace `/agents`, see
`web.agents`) with the token, says what it offers (`hello`: cores, memory, processes, simulators,
clock offset), and then does what the hub asks: `launch` a worker (the real `worker_main`, in a local
forkserver process with a real pipe), `send` it control messages, `signal` it, `end_run`. Everything a
worker sends up its pipe is relayed to the hub as a numbered `msg`, with its timestamps moved onto the
controller's clock, and kept in an outbox until the hub acknowledges it: after a dropped connection the
agent reconnects by itself and resends what was not acknowledged, so windows arrive late, not never.

The outbox is bounded (`MAX_OUTBOX_MESSAGES`, `MAX_OUTBOX_BYTES`); beyond that the oldest log and
control messages go first, then the oldest batches, counted as `dropped` in the agent's `status`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import platform
import queue
import resource
import signal
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import psutil

from harness import __version__
from harness.errors import UsageError
from harness.remote import BYTES_KEY, jsonable, restore

log = logging.getLogger("harness.agent")

NAMESPACE = "/agents"
MAX_OUTBOX_MESSAGES = 100_000
MAX_OUTBOX_BYTES = 256 * 1024 * 1024
STATUS_EVERY = 1.0
"""Seconds between `status` messages: the hub takes an agent it has not heard from for 3.5 s as out of
reach (`web.agents.SILENT_AFTER`), so a silent link cut is noticed within about 3 s."""
CLOCK_EVERY = 60.0
CLOCK_SAMPLES = 5


class Outbox:
    """Relayed messages not yet acknowledged by the hub, in seq order, bounded."""

    def __init__(self, max_messages: int = MAX_OUTBOX_MESSAGES, max_bytes: int = MAX_OUTBOX_BYTES) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.next_seq = 1
        self.acked = 0
        self.dropped = 0
        self.bytes = 0
        self._items: OrderedDict[int, tuple[dict[str, Any], int]] = OrderedDict()
        self._others: deque[int] = deque()
        """Seqs of the non-batch messages, oldest first (the first to go when the outbox is full)."""
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, msg: dict[str, Any]) -> int:
        """Number `msg`, keep it, and wake the sender."""
        size = _size(msg)
        with self.changed:
            seq = self.next_seq
            self.next_seq += 1
            msg["seq"] = seq
            self._items[seq] = (msg, size)
            self.bytes += size
            if msg.get("kind") != "batch":
                self._others.append(seq)
            while len(self._items) > self.max_messages or self.bytes > self.max_bytes:
                self._drop_one()
            self.changed.notify_all()
        return seq

    def _drop_one(self) -> None:
        while self._others:
            seq = self._others.popleft()
            if seq in self._items:
                self.bytes -= self._items.pop(seq)[1]
                self.dropped += 1
                return
        _, (_, size) = self._items.popitem(last=False)
        self.bytes -= size
        self.dropped += 1

    def ack(self, seq: int) -> None:
        """The hub has everything up to `seq`."""
        with self.changed:
            self.acked = max(self.acked, seq)
            while self._items:
                first = next(iter(self._items))
                if first > self.acked:
                    break
                self.bytes -= self._items.pop(first)[1]
            self.changed.notify_all()

    def after(self, seq: int) -> list[dict[str, Any]]:
        """The kept messages numbered above `seq`, in order."""
        with self._lock:
            return [msg for s, (msg, _) in self._items.items() if s > seq]

    def first_seq(self) -> int:
        """The lowest seq still kept (or the next one, when empty)."""
        with self._lock:
            return next(iter(self._items), self.next_seq)


def _size(msg: dict[str, Any]) -> int:
    """A cheap estimate of a message's size in bytes."""
    payload = msg.get("payload") or {}
    if msg.get("kind") != "batch" or not isinstance(payload, dict):
        return 256 + len(str(payload))
    size = 512
    for w in payload.get("windows", []):
        size += 200 + _length(w.get("hist")) + _length(w.get("hist_intended"))
    for key in ("metrics", "datapoints", "events"):
        size += 150 * len(payload.get(key, []))
    return size


def _length(value: Any) -> int:
    """The length of an encoded histogram, as bytes or as `jsonable` made it."""
    if isinstance(value, dict):
        value = value.get(BYTES_KEY)
    return len(value) if isinstance(value, str | bytes) else 0


def shift_times(kind: str, payload: Any, offset: float) -> Any:
    """A worker message with its timestamps moved onto the controller's clock (offset seconds)."""
    if not offset or not isinstance(payload, dict):
        return payload
    whole = round(offset)
    if kind == "batch":
        out = dict(payload)
        if whole:
            out["windows"] = [{**w, "t": w["t"] + whole} for w in payload.get("windows", [])]
            out["metrics"] = [{**m, "t": m["t"] + whole} for m in payload.get("metrics", [])]
        for key in ("datapoints", "events"):
            out[key] = [{**d, "t": d["t"] + offset} if "t" in d else d for d in payload.get(key, [])]
        if isinstance(payload.get("health"), dict) and "t" in payload["health"]:
            out["health"] = {**payload["health"], "t": payload["health"]["t"] + offset}
        return out
    if "t" in payload and isinstance(payload["t"], int | float):
        return {**payload, "t": payload["t"] + offset}
    return payload


def available_simulators() -> list[str]:
    """Registered simulator names whose module imports here."""
    from harness.simulator import registered_simulators

    names = []
    for name, spec in sorted(registered_simulators().items()):
        try:
            importlib.import_module(spec.partition(":")[0])
        except Exception:  # a family whose extra is not installed here
            continue
        names.append(name)
    return names


def capacity(processes: int | None) -> dict[str, Any]:
    """What this machine offers."""
    cores = os.cpu_count() or 1
    try:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        nofile = -1
    return {
        "cores": cores,
        "memory_mb": round(psutil.virtual_memory().total / 1e6),
        "processes": processes or cores,
        "simulators": available_simulators(),
        "ulimit_nofile": nofile,
        "python": platform.python_version(),
        "harness_version": __version__,
    }


@dataclass
class _Worker:
    run_id: str
    group: str
    index: int
    process: Any
    conn: Connection | None


class Agent:
    """One agent process: the Socket.IO client, the outbox and the local workers."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        name: str | None = None,
        labels: list[str] | None = None,
        processes: int | None = None,
        work_dir: Path | None = None,
    ) -> None:
        import socketio

        self.url = url.rstrip("/")
        self.token = token
        self.name = name or platform.node() or "agent"
        self.labels = labels or []
        self.agent_id = uuid.uuid4().hex
        self.work_dir = Path(work_dir or Path.cwd() / "harness-agent")
        self.capacity = capacity(processes)
        self.outbox = Outbox()
        self.clock_offset = 0.0
        self.refused: str | None = None
        self.workers: dict[tuple[str, str, int], _Worker] = {}
        self._workers_lock = threading.Lock()
        self._ctx = multiprocessing.get_context("forkserver")
        self._emit_lock = threading.Lock()
        self._ready = threading.Event()
        """Set once `hello` was answered on the current connection (the sender may send)."""
        self._sent = 0
        self._events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ended_runs: set[str] = set()
        self.sio = socketio.Client(
            reconnection=True,
            reconnection_attempts=0,
            reconnection_delay=0.5,
            reconnection_delay_max=5,
            handle_sigint=False,
            logger=False,
            engineio_logger=False,
        )
        for event in ("connect", "disconnect", "connect_error", "ack"):
            self.sio.on(event, getattr(self, f"_on_{event}"), namespace=NAMESPACE)
        for event in ("launch", "send", "signal", "end_run"):
            self.sio.on(event, self._command_handler(event), namespace=NAMESPACE)
        self._commands_lock = threading.Lock()
        self._next_cseq: int | None = None
        """The number of the next command to run (None until the hub's hello answer says)."""
        self._held: dict[int, tuple[float, str, dict[str, Any]]] = {}

    # -- connection --------------------------------------------------------------------------
    def connect(self, stop: threading.Event | None = None, timeout: float = 15.0) -> bool:
        """Connect, retrying while the controller is unreachable, until `stop` is set (then False);
        UsageError if the controller refuses the agent."""
        import socketio

        self.work_dir.mkdir(parents=True, exist_ok=True)
        stop = stop or threading.Event()
        delay = 0.5
        while True:
            try:
                self.sio.connect(
                    self.url,
                    auth={"token": self.token or "", "name": self.name},
                    namespaces=[NAMESPACE],
                    wait_timeout=timeout,
                )
                break
            except socketio.exceptions.ConnectionError as exc:
                if self.refused is not None:
                    raise UsageError(f"controller refused the agent: {self.refused}") from None
                if delay == 0.5:
                    log.warning("cannot reach the controller at %s (%s): retrying", self.url, exc)
            if stop.wait(delay):
                return False
            delay = min(5.0, delay * 2)
        for target in (self._session, self._sender, self._reader):
            threading.Thread(target=target, name=f"agent-{target.__name__.strip('_')}", daemon=True).start()
        return True

    def _on_connect(self) -> None:
        self._events.put("connect")

    def _on_disconnect(self, reason: Any = None) -> None:
        self._ready.clear()
        if self._stop.is_set():
            return
        log.warning("lost the controller: reconnecting (relayed messages are kept until it has them)")
        if reason == self.sio.reason.SERVER_DISCONNECT:
            # the client reconnects by itself after a dropped transport, not when the hub closed us
            threading.Thread(target=self._reconnect, name="agent-reconnect", daemon=True).start()

    def _reconnect(self) -> None:
        import socketio

        delay = 0.5
        while not self._stop.wait(delay):
            if self.sio.connected:
                return
            try:
                self.sio.connect(
                    self.url,
                    auth={"token": self.token or "", "name": self.name},
                    namespaces=[NAMESPACE],
                    wait_timeout=15,
                )
                return
            except (socketio.exceptions.ConnectionError, ValueError) as exc:
                log.debug("reconnecting: %s", exc)
            delay = min(5.0, delay * 2)

    def _on_connect_error(self, data: Any = None) -> None:
        # a refusal comes over an established connection; an unreachable controller is not one
        if self.sio.eio.state == "connected":
            message = data.get("message") if isinstance(data, dict) else data
            self.refused = str(message or "refused")

    def _emit(self, event: str, data: Any, callback: Any = None) -> None:
        with self._emit_lock:
            self.sio.emit(event, data, namespace=NAMESPACE, callback=callback)

    def _call(self, event: str, data: Any, timeout: float = 10.0) -> Any:
        done = threading.Event()
        answer: list[Any] = []

        def callback(*args: Any) -> None:
            answer.extend(args)
            done.set()

        self._emit(event, data, callback)
        if not done.wait(timeout):
            raise TimeoutError(f"no answer to {event} in {timeout:.0f}s")
        return answer[0] if answer else None

    def _session(self) -> None:
        """On each connection: measure the clock, say hello, let the sender resend; then report status."""
        next_status = next_clock = 0.0
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=0.25)
            except queue.Empty:
                event = None
            try:
                if event == "connect":
                    self._measure_clock()
                    answer = self._call("hello", self._hello())
                    self.outbox.ack(int(answer.get("ack", 0)))
                    with self._commands_lock:
                        first = int(answer.get("cseq", 1))
                        self._held = {c: h for c, h in self._held.items() if c >= first}
                        self._next_cseq = first
                        self._run_held()
                    with self.outbox.changed:
                        self._sent = self.outbox.acked  # resend everything the hub does not have
                        self._ready.set()
                        self.outbox.changed.notify_all()
                    next_clock = time.monotonic() + CLOCK_EVERY
                    log.info(
                        "connected to %s as %s (clock offset %+.3fs)", self.url, self.name, self.clock_offset
                    )
                if not self._ready.is_set():
                    continue
                if self._held:
                    with self._commands_lock:
                        self._run_held(skip_gaps=True)
                now = time.monotonic()
                if now >= next_clock:
                    next_clock = now + CLOCK_EVERY
                    self._measure_clock()
                if now >= next_status:
                    next_status = now + STATUS_EVERY
                    self._emit("status", self._status())
            except Exception as exc:  # the connection dropped under us: the next connect starts over
                log.debug("agent session: %s", exc)

    def _measure_clock(self) -> None:
        best: tuple[float, float] | None = None
        for _ in range(CLOCK_SAMPLES):
            t0 = time.time()
            answer = self._call("clock", {"t0": t0}, timeout=5.0)
            t2 = time.time()
            rtt = t2 - t0
            offset = float(answer["t"]) - (t0 + t2) / 2
            if best is None or rtt < best[0]:
                best = (rtt, offset)
        if best is not None:
            self.clock_offset = best[1]

    def _hello(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "name": self.name,
            "labels": self.labels,
            "capacity": self.capacity,
            "clock_offset_s": self.clock_offset,
            "runs": self._runs(),
            "first_seq": self.outbox.first_seq(),
        }

    def _runs(self) -> dict[str, list[list[Any]]]:
        runs: dict[str, list[list[Any]]] = {}
        with self._workers_lock:
            for w in self.workers.values():
                runs.setdefault(w.run_id, []).append([w.group, w.index, w.process.exitcode is None])
        return runs

    def _status(self) -> dict[str, Any]:
        me = psutil.Process()
        with self._workers_lock:
            alive = sum(1 for w in self.workers.values() if w.process.exitcode is None)
        return {
            "clock_offset_s": self.clock_offset,
            "workers": alive,
            "outbox": len(self.outbox),
            "dropped": self.outbox.dropped,
            "cpu_percent": psutil.cpu_percent(),
            "rss_mb": round(me.memory_info().rss / 1e6, 1),
            "runs": self._runs(),
        }

    def _sender(self) -> None:
        """Send the outbox in order whenever connected; after a reconnect, from the last ack."""
        while not self._stop.is_set():
            with self.outbox.changed:
                pending = self.outbox.after(self._sent) if self._ready.is_set() else []
                if not pending:
                    self.outbox.changed.wait(0.5)
                    continue
            for msg in pending:
                if not self._ready.is_set():
                    break
                try:
                    self._emit("msg", msg)
                except Exception:  # not connected any more: resent after the next hello
                    break
                self._sent = max(self._sent, int(msg["seq"]))

    def _command_handler(self, event: str) -> Any:
        def handler(data: Any) -> None:
            if isinstance(data, dict):
                self._command(event, restore(data))

        return handler

    def _command(self, event: str, data: dict[str, Any]) -> None:
        """Run the hub's commands in their `cseq` order (each arrives in its own thread)."""
        with self._commands_lock:
            cseq = data.get("cseq")
            if not isinstance(cseq, int):
                self._run_command(event, data)
                return
            if self._next_cseq is not None and cseq < self._next_cseq:
                return
            self._held[cseq] = (time.monotonic(), event, data)
            self._run_held()

    def _run_held(self, skip_gaps: bool = False) -> None:
        """Run held commands in order; with `skip_gaps`, a gap open for 1 s is skipped (the caller
        holds `_commands_lock`)."""
        while self._held and self._next_cseq is not None:
            if self._next_cseq not in self._held:
                first = min(self._held)
                if not (skip_gaps and time.monotonic() - self._held[first][0] >= 1.0):
                    return
                self._next_cseq = first
            _, event, data = self._held.pop(self._next_cseq)
            self._next_cseq += 1
            self._run_command(event, data)

    def _run_command(self, event: str, data: dict[str, Any]) -> None:
        try:
            getattr(self, f"_on_{event}")(data)
        except Exception:
            log.exception("could not run the controller's %s", event)

    def _on_ack(self, data: Any) -> None:
        if isinstance(data, dict):
            self.outbox.ack(int(data.get("seq", 0)))

    # -- workers -----------------------------------------------------------------------------
    def _reach(self, targets: dict[str, str], beside_controller: Any) -> dict[str, str]:
        """Target URLs as this agent reaches them: an embedded target runs beside the controller, on the
        address the controller serves the hub on, so its host becomes the controller's as this agent
        knows it (from `--controller`); the port stays."""
        host = urlsplit(self.url).hostname
        if not host or not isinstance(beside_controller, list):
            return targets
        shown = f"[{host}]" if ":" in host else host
        for name in beside_controller:
            url = targets.get(str(name))
            if url:
                parts = urlsplit(url)
                targets[str(name)] = urlunsplit(parts._replace(netloc=f"{shown}:{parts.port}"))
        return targets

    def _on_launch(self, data: dict[str, Any]) -> None:
        from harness.worker import WorkerSpec, worker_main

        try:
            run_id, group, index = str(data["run_id"]), str(data["group"]), int(data["index"])
            fields = dict(data["spec"])
            run_dir = self.work_dir / "runs" / run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            fields["run_dir"] = str(run_dir)
            fields["targets"] = self._reach(dict(fields.get("targets") or {}), data.get("controller_targets"))
            spec = WorkerSpec(**fields)
            parent, child = self._ctx.Pipe(duplex=True)
            process = self._ctx.Process(
                target=worker_main, args=(spec, child), name=f"harness-worker-{spec.label}", daemon=False
            )
            process.start()
            child.close()
        except Exception as exc:
            log.exception("could not launch a worker")
            self._relay(
                data.get("run_id"), data.get("group"), data.get("index"), "boot_error", {"message": repr(exc)}
            )
            self._relay(data.get("run_id"), data.get("group"), data.get("index"), "exited", {"code": 4})
            return
        with self._workers_lock:
            self.workers[(run_id, group, index)] = _Worker(run_id, group, index, process, parent)
        log.info("run %s: started worker %s#%d (pid %s)", run_id, group, index, process.pid)

    def _worker(self, data: dict[str, Any]) -> _Worker | None:
        try:
            key = (str(data["run_id"]), str(data["group"]), int(data["index"]))
        except (KeyError, TypeError, ValueError):
            return None
        with self._workers_lock:
            return self.workers.get(key)

    def _on_send(self, data: dict[str, Any]) -> None:
        worker = self._worker(data)
        if worker is not None and worker.conn is not None:
            with contextlib.suppress(OSError, ValueError, EOFError):
                worker.conn.send((str(data["kind"]), data.get("payload") or {}))

    def _on_signal(self, data: dict[str, Any]) -> None:
        worker = self._worker(data)
        if worker is not None and worker.process.exitcode is None:
            with contextlib.suppress(OSError, ValueError):
                worker.process.kill() if data.get("sig") == "kill" else worker.process.terminate()

    def _on_end_run(self, data: dict[str, Any]) -> None:
        run_id = str(data.get("run_id"))
        with self._workers_lock:
            mine = [w for w in self.workers.values() if w.run_id == run_id]
        for w in mine:
            if w.process.exitcode is None:
                with contextlib.suppress(OSError, ValueError):
                    w.process.kill()
        self._ended_runs.add(run_id)
        if mine:
            log.info("run %s ended: %d workers", run_id, len(mine))

    def _relay(self, run_id: Any, group: Any, index: Any, kind: str, payload: Any) -> None:
        self.outbox.add(
            {
                "run_id": run_id,
                "group": group,
                "index": index,
                "kind": kind,
                "payload": jsonable(shift_times(kind, payload, self.clock_offset)),
            }
        )

    def _reader(self) -> None:
        """Relay every worker's pipe messages; on a closed pipe, report the worker's exit."""
        while not self._stop.is_set():
            with self._workers_lock:
                conns = {w.conn: w for w in self.workers.values() if w.conn is not None}
            if not conns:
                time.sleep(0.05)
                continue
            for ready in wait(list(conns), timeout=0.2):
                worker = conns[cast(Connection, ready)]
                try:
                    kind, payload = worker.conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    self._reap(worker)
                    continue
                self._relay(worker.run_id, worker.group, worker.index, kind, payload)

    def _reap(self, worker: _Worker) -> None:
        if worker.conn is not None:
            worker.conn.close()
            worker.conn = None
        worker.process.join(timeout=5.0)
        code = worker.process.exitcode
        self._relay(
            worker.run_id, worker.group, worker.index, "exited", {"code": code if code is not None else -9}
        )
        with self._workers_lock:
            key = (worker.run_id, worker.group, worker.index)
            if self.workers.get(key) is worker:
                del self.workers[key]

    # -- stop --------------------------------------------------------------------------------
    def stop(self, grace: float = 5.0) -> None:
        """Stop the workers gracefully, hand the hub what is left in the outbox, disconnect."""
        with self._workers_lock:
            workers = list(self.workers.values())
        for w in workers:
            if w.conn is not None:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(("stop", {"grace": grace}))
        deadline = time.monotonic() + grace + 5.0
        while time.monotonic() < deadline and any(w.process.exitcode is None for w in workers):
            time.sleep(0.05)
        for w in workers:
            if w.process.exitcode is None:
                with contextlib.suppress(OSError, ValueError):
                    w.process.kill()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self.sio.connected and len(self.outbox):
            time.sleep(0.1)
        self._stop.set()
        with contextlib.suppress(Exception):
            self.sio.disconnect()


def run_agent(
    url: str,
    token: str | None,
    name: str | None,
    labels: list[str],
    processes: int | None,
    work_dir: Path | None,
) -> int:
    """`harness agent`: serve the controller until SIGINT/SIGTERM; 0 after a graceful stop."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["harness.worker", "harness.targets.runner"]
    )
    agent = Agent(url, token, name, labels, processes, work_dir)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set())
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        log.debug("agent %s: connecting to %s", agent.name, agent.url)
        if not agent.connect(stop):
            return 0
        while not stop.wait(0.5):
            pass
        log.info("agent %s: stopping", agent.name)
        agent.stop()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 0


__all__ = ["Agent", "Outbox", "run_agent", "shift_times"]
