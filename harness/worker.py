"""A worker process: one asyncio loop running many virtual users of one group.

The supervisor starts `worker_main` with the `forkserver` method and talks to it over one duplex
pipe. Down the pipe come control messages — `("set", {"target": n})` (users in the closed model,
iterations per second in the open model) and `("stop", {"grace": s})`. Up the pipe go `hello`, one
`batch` a second (metrics, health; it doubles as the heartbeat), `log` records, `done` when the
group's iterations are used up, and `bye`. A worker never touches the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from harness.errors import HarnessError
from harness.metrics import Metrics, error_text, schedule_lag
from harness.profile import Pacing, ThinkTime
from harness.simulator import Simulator, SimulatorContext, StopUser, User, load_simulator

WORKER_BOOT_ERROR = 4
"""Exit code of a worker that could not start; the supervisor does not restart it."""
ITERATION = "(iteration)"
"""The name errors are recorded under when a simulator hook raises."""


@dataclass
class WorkerSpec:
    """Everything a worker needs; pickled to the child."""

    run_id: str
    group: str
    index: int
    workers: int
    simulator: str
    options: dict[str, Any]
    mode: str
    targets: dict[str, str]
    run_dir: str
    seed: int | None = None
    think_time: dict[str, Any] = field(default_factory=dict)
    arrival: str = "uniform"
    max_in_flight: int = 1000
    iterations: int | None = None
    total_iterations: int | None = None
    log_level: int = logging.INFO
    secrets: list[str] = field(default_factory=list)
    prepared: Any = None

    @property
    def label(self) -> str:
        """`group#index`, how logs and events name this worker."""
        return f"{self.group}#{self.index}"


class _PipeLogHandler(logging.Handler):
    """Ships log records to the controller over the worker's pipe."""

    def __init__(self, send: Any, label: str) -> None:
        super().__init__()
        self._send = send
        self._label = label

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[0] is not None:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            self._send(
                "log",
                {
                    "t": record.created,
                    "level": record.levelno,
                    "logger": record.name,
                    "message": message,
                    "worker": self._label,
                },
            )
        except Exception:
            self.handleError(record)


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides when we stop
    send_lock = threading.Lock()

    def send(kind: str, payload: Any) -> None:
        with send_lock:
            try:
                conn.send((kind, payload))
            except (OSError, EOFError, BrokenPipeError):
                pass

    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(send, spec.label)]
    root.setLevel(spec.log_level)
    log = logging.getLogger(f"harness.worker.{spec.group}")
    try:
        sim_cls = load_simulator(spec.simulator)
        options = sim_cls.Options.model_validate(spec.options)
    except Exception as exc:  # a worker that cannot boot must say why and not be restarted
        send("boot_error", {"message": error_text(exc) if isinstance(exc, HarnessError) else repr(exc)})
        conn.close()
        os._exit(WORKER_BOOT_ERROR)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    # Many long-lived user tasks make the cyclic GC rescan the same objects over and over (starting
    # 100k users took 13.5 s with the defaults, 8 s without this): freeze what booting made, and
    # collect the young generation less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    worker = Worker(spec, sim_cls, options, send, log)
    code = 0
    try:
        runner(worker.run(conn))
    except BaseException as exc:
        if not worker.booted:  # setup() failed: restarting would fail the same way
            send("boot_error", {"message": f"{spec.simulator} setup failed: {error_text(exc)}"})
            code = WORKER_BOOT_ERROR
        else:  # report, then exit non-zero so the supervisor restarts us
            log.error("worker crashed: %s", exc, exc_info=True)
            code = 1
    finally:
        send("bye", {"code": code})
        conn.close()
    sys.stdout.flush()
    os._exit(code)


class Worker:
    """Runs one group's share of users (closed model) or arrivals (open model)."""

    def __init__(
        self, spec: WorkerSpec, sim_cls: type[Simulator], options: Any, send: Any, log: logging.Logger
    ):
        from pydantic import TypeAdapter

        self.spec = spec
        self.send = send
        self.log = log
        seed = None if spec.seed is None else hash((spec.seed, spec.group, spec.index)) & 0xFFFFFFFF
        self.rng = random.Random(seed)
        self.think = TypeAdapter(ThinkTime).validate_python(spec.think_time) if spec.think_time else None
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=sim_cls.threads, thread_name_prefix=spec.label)
        run_dir = Path(spec.run_dir)
        self.ctx = SimulatorContext(
            run_id=spec.run_id,
            group=spec.group,
            worker_index=spec.index,
            workers=spec.workers,
            options=options,
            targets=spec.targets,
            metrics=self.metrics,
            log=log,
            rng=self.rng,
            run_dir=run_dir,
            executor=self.executor,
            prepared=spec.prepared,
        )
        self.sim = sim_cls(self.ctx)
        self.target = 0.0
        self.set_at = 0.0
        self.booted = False
        self.users: dict[int, asyncio.Task[None]] = {}
        self.user_objs: dict[int, User] = {}
        self.thinking: set[int] = set()
        self.finished_users = 0
        self.next_user_id = 0
        self.free_users: list[User] = []
        self.in_flight = 0
        self.stop_hooks_running = 0
        self.started_iterations = 0
        self.stopping = False
        self.stopped = asyncio.Event()
        self.rate_changed = asyncio.Event()
        self.done_sent = False
        self.tasks: set[asyncio.Task[Any]] = set()
        # per-second health counters
        self.dropped = 0
        self.iterations_ok = 0
        self.iterations_failed = 0
        self.lag_max = 0.0
        self.lag_sum = 0.0
        self.lag_n = 0
        self.sched_lag_max = 0.0
        self.logged_errors: set[str] = set()
        self.process = psutil.Process()
        self.process.cpu_percent()

    # -- control ---------------------------------------------------------------------------
    async def run(self, conn: Connection) -> None:
        """Boot the simulator, then serve control messages until stopped."""
        loop = asyncio.get_running_loop()
        reader = threading.Thread(target=self._read_pipe, args=(conn, loop), daemon=True)
        reader.start()
        await self.sim.setup()
        self.booted = True
        self.send("hello", {"pid": os.getpid(), "t": time.time()})
        flusher = self._spawn(self._flush_loop())
        lag_probe = self._spawn(self._lag_loop())
        main = self._spawn(self._arrivals() if self.spec.mode == "open" else self._balance_users())
        await self.stopped.wait()
        main.cancel()
        lag_probe.cancel()
        await self._drain_users(self.grace)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sim.teardown(), timeout=max(self.grace, 1.0))
        flusher.cancel()
        self._flush(everything=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _read_pipe(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                # The controller is gone: stop at once rather than run unsupervised.
                kind, payload = "stop", {"grace": 1.0}
            try:
                loop.call_soon_threadsafe(self._control, kind, payload)
            except RuntimeError:
                return
            if kind == "stop":
                return

    grace = 5.0

    def _control(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "set":
            self.target = max(0.0, float(payload["target"]))
            self.set_at = asyncio.get_running_loop().time()
            self.rate_changed.set()
        elif kind == "stop" and not self.stopping:
            self.stopping = True
            self.grace = float(payload.get("grace", 5.0))
            self.stopped.set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- closed model ----------------------------------------------------------------------
    async def _balance_users(self) -> None:
        """Keep the number of live users at the target, spreading new users over each second."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            want = int(round(self.target)) - self.finished_users
            have = len(self.users)
            if want > have and not self._quota_used():
                # spread the additions over the second after each `set` so a step is not one burst
                ticks_left = max(1, round((1.0 - (loop.time() - self.set_at)) / 0.1))
                for _ in range(math.ceil((want - have) / ticks_left)):
                    self._start_user()
            elif want < have:
                for user_id in sorted(self.users, reverse=True)[: have - want]:
                    self._retire_user(user_id)
            self._maybe_done()
            await asyncio.sleep(0.1)

    def _start_user(self) -> None:
        user = User(self.next_user_id)
        self.next_user_id += 1
        self.user_objs[user.id] = user
        self.users[user.id] = self._spawn(self._user_loop(user))

    def _retire_user(self, user_id: int) -> None:
        user = self.user_objs.get(user_id)
        if user is None:
            return
        user._stopping = True
        task = self.users.pop(user_id, None)
        if task is not None and user_id in self.thinking:
            task.cancel()

    async def _user_loop(self, user: User) -> None:
        finished = False
        try:
            if not await self._start_hook(user):
                return
            pacing = getattr(self.think, "interval", None)
            while not user.stopping and not self.stopping:
                if self.spec.iterations is not None and user.iterations >= self.spec.iterations:
                    finished = True
                    break
                if not self._take_quota():
                    break
                began = time.perf_counter()
                if not await self._iteration(user, None):
                    break
                if user.stopping or self.stopping:
                    break
                if pacing is not None:
                    pause = pacing - (time.perf_counter() - began)
                elif self.think is not None and not isinstance(self.think, Pacing):
                    pause = self.think.sample(self.rng)
                else:
                    pause = 0.0
                self.thinking.add(user.id)
                try:
                    # sleep(0) still yields, so a user with no think time cannot starve the loop
                    await asyncio.sleep(max(0.0, pause))
                finally:
                    self.thinking.discard(user.id)
        except asyncio.CancelledError:
            pass
        finally:
            self.users.pop(user.id, None)
            self.user_objs.pop(user.id, None)
            if finished:
                self.finished_users += 1
            self.stop_hooks_running += 1  # so a drain waits for it (a run's finish may flush data)
            try:
                await self._stop_hook(user)
            finally:
                self.stop_hooks_running -= 1
            self._maybe_done()

    async def _start_hook(self, user: User) -> bool:
        try:
            await self.sim.start_user(user)
            return True
        except StopUser:
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._hook_failed("start_user", exc)
            # back off so a failing start does not spin; the balancer will try again
            await asyncio.sleep(1.0)
            return False

    async def _stop_hook(self, user: User) -> None:
        try:
            await asyncio.wait_for(self.sim.stop_user(user), timeout=max(self.grace, 1.0))
        except (asyncio.CancelledError, StopUser):
            pass
        except Exception as exc:
            self._hook_failed("stop_user", exc)

    async def _iteration(self, user: User, lag: float | None) -> bool:
        """Run one iteration; False if the user should stop."""
        user.iterations += 1
        self.in_flight += 1
        token = schedule_lag.set(lag)
        try:
            await self.sim.iteration(user)
            self.iterations_ok += 1
            return True
        except StopUser:
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.iterations_failed += 1
            self._hook_failed("iteration", exc)
            return True
        finally:
            schedule_lag.reset(token)
            self.in_flight -= 1

    def _hook_failed(self, hook: str, exc: BaseException) -> None:
        message = error_text(exc)
        self.metrics.request(
            f"{ITERATION}" if hook == "iteration" else f"({hook})", 0.0, kind="error", ok=False, error=exc
        )
        if message not in self.logged_errors and len(self.logged_errors) < 100:
            self.logged_errors.add(message)
            self.log.warning("%s raised in %s: %s", type(self.sim).__name__, hook, message, exc_info=exc)

    def _take_quota(self) -> bool:
        if self.spec.total_iterations is None:
            return True
        if self.started_iterations >= self.spec.total_iterations:
            return False
        self.started_iterations += 1
        return True

    def _quota_used(self) -> bool:
        return (
            self.spec.total_iterations is not None and self.started_iterations >= self.spec.total_iterations
        )

    def _maybe_done(self) -> None:
        if self.done_sent or self.stopping:
            return
        closed_done = (
            self.spec.mode == "closed"
            and self.spec.iterations is not None
            and self.target >= 1
            and self.finished_users >= int(round(self.target))
        )
        if (self._quota_used() and not self.users and self.in_flight == 0) or closed_done:
            self.done_sent = True
            self.send("done", {"iterations": self.started_iterations})

    # -- open model ------------------------------------------------------------------------
    async def _arrivals(self) -> None:
        """Start iterations on schedule; late starts carry their lag, impossible ones are dropped."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self.stopping:
            if self.target <= 0 or self._quota_used():
                self.rate_changed.clear()
                self._maybe_done()
                await self.rate_changed.wait()
                next_at = loop.time()
                continue
            now = loop.time()
            if now < next_at:
                self.rate_changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.rate_changed.wait(), timeout=next_at - now)
                continue
            while next_at <= now and not self.stopping and self.target > 0:
                lag = now - next_at
                self.sched_lag_max = max(self.sched_lag_max, lag)
                if self.in_flight >= self.spec.max_in_flight or not self._take_quota():
                    self.dropped += 1
                else:
                    self._spawn(self._open_iteration(lag))
                gap = 1.0 / self.target
                next_at += self.rng.expovariate(1.0 / gap) if self.spec.arrival == "poisson" else gap
            # yield once per batch so a backlog cannot starve the users
            await asyncio.sleep(0)

    async def _open_iteration(self, lag: float) -> None:
        user = self.free_users.pop() if self.free_users else None
        if user is None:
            user = User(self.next_user_id)
            self.next_user_id += 1
            self.in_flight += 1  # count the start as in flight so max_in_flight holds
            try:
                started = await self._start_hook(user)
            finally:
                self.in_flight -= 1
            if not started:
                return
        self.user_objs[user.id] = user
        keep = await self._iteration(user, lag)
        if keep and not self.stopping:
            self.free_users.append(user)
        else:
            self.user_objs.pop(user.id, None)
            await self._stop_hook(user)

    # -- stopping --------------------------------------------------------------------------
    async def _drain_users(self, grace: float) -> None:
        """Let in-flight iterations finish within `grace`, then cancel what is left."""
        for user_id in list(self.user_objs):
            self._retire_user(user_id)
        deadline = time.monotonic() + grace
        while (self.in_flight > 0 or self.users or self.stop_hooks_running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        current = asyncio.current_task()
        pending = [t for t in self.tasks if not t.done() and t is not current]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for user in self.free_users:
            await self._stop_hook(user)
        self.free_users.clear()

    # -- health and shipping ---------------------------------------------------------------
    async def _lag_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.1)
            lag = max(0.0, loop.time() - start - 0.1)
            self.lag_max = max(self.lag_max, lag)
            self.lag_sum += lag
            self.lag_n += 1

    async def _flush_loop(self) -> None:
        while True:
            now = time.time()
            # ship just after each second boundary
            await asyncio.sleep(1.0 - (now % 1.0) + 0.02)
            self._flush()

    def _flush(self, everything: bool = False) -> None:
        batch = self.metrics.drain(everything=everything)
        mem = self.process.memory_info()
        batch["health"] = {
            "t": time.time(),
            "users": len(self.users) if self.spec.mode == "closed" else self.in_flight,
            "target": self.target,
            "in_flight": self.in_flight,
            "cpu_percent": self.process.cpu_percent(),
            "rss_bytes": mem.rss,
            "loop_lag_max_ms": self.lag_max * 1000,
            "loop_lag_mean_ms": (self.lag_sum / self.lag_n * 1000) if self.lag_n else 0.0,
            "schedule_lag_max_ms": self.sched_lag_max * 1000,
            "dropped": self.dropped,
            "iterations": self.iterations_ok + self.iterations_failed,
            "iterations_failed": self.iterations_failed,
        }
        self.dropped = self.iterations_ok = self.iterations_failed = 0
        self.lag_max = self.lag_sum = self.sched_lag_max = 0.0
        self.lag_n = 0
        self.send("batch", batch)
