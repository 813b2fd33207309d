"""`mlops-sdk`: training runs logging through the real pluto-ml SDK, measured where the SDK buffers.

As the seed's `locustfile.py` (`seed-systems.md` §4.2), each virtual user is one training run: it
creates the run (`pluto.init(project="load-test-project", name="load-test-run-<user>", config={
"test_type": "load_test", "target_rps": 1000})`, which logs in and creates it on the server), then each
iteration is one training step that logs, chosen by weight (default metrics 5, batch 3):

    metrics   run.log({"train/loss", "train/accuracy", "val/loss", "val/accuracy", "learning_rate",
                       "epoch"}, step=n)
    batch     run.log({"batch/loss", "batch/size"}, step=n)

with values from a training curve per run (`curves.TrainingCurve`: loss falling, accuracy rising,
learning-rate warm-up and decay, noise). The seed's batch task called `run._log(data, step, t)`, which
in pluto-ml 0.0.29 only writes the legacy local store and, with the sync process on, sends NOTHING: 37.5%
of the seed's "SDK calls" were no-ops. Here that task logs the same keys with an explicit step through
`run.log`, which is what reaches the server. Every `console_every` steps (10) the run also sends one
console line, `Training step N completed - batch_size: B`, through the run's own `run._log_console`;
the SDK's console capture is disabled (`disable_console`) because it swaps the process-wide
stdout/stderr and file descriptors, which mixes up lines when one process holds many runs. After
`steps` steps (10,000) the run is finished and the user's next iteration creates a new one; a stopped
user finishes its run. Finishing waits until the run's queue is uploaded (up to `shutdown_timeout`).

`run.log` does not send anything: it appends a row to the run's SQLite queue (its `sync.db`) and
returns in tens of microseconds; an uploader sends up to `batch_size` rows every `flush_interval`
(the SDK's 100 and 1 s, so at most about 100 logged steps a second per run get through). So what is
recorded is named for what it measures (kind `sdk`):

- request `run.log`: the wall time of the `run.log` call itself, what the training loop pays. It is
  called on the worker's event loop (50 runs in one worker on 2 cores: p50 70-80 µs, p99 0.4-1.2 ms);
  a hop to a thread would double the loop's share of each step for nothing (see `_log_inline`). The
  exception goes to a thread, and its time is in `run.log` too: the first call with a key the run has
  not logged before, which POSTs `/api/runs/logName/add` synchronously (with the SDK's retries).
- phase `flush_latency` (kept out of the totals): for each logged row (one `run.log` call, 2 or 6
  points), the time from the call to the server's 2xx for the upload carrying it.
- requests `run_create` (`pluto.init`: login, create, sync start) and `run_finish` (`run.finish()`:
  stopping its threads, draining the queue, stopping the uploader, the COMPLETED status update). A
  run_finish fails if the status update was not confirmed.
- counters `points_logged` (metric values handed to `run.log`), `points_delivered` (values the server
  acknowledged; its rate is points per second delivered), `points_dropped` (logged but not
  acknowledged by the end of the run's `finish`, or still unsent when the worker stopped),
  `points_retried` (values in rows whose upload needed more than one attempt, each row once),
  `console_lines` (lines sent with `_log_console`) and `runs_cancelled` (see below); a data point per
  finished run (its server id, steps, points logged, delivered, dropped and retried, seconds).

Two ways to run the uploader (`sync`):

- `process` (default, what users run): the SDK's own `python -m pluto.sync` subprocess per run,
  untouched. It costs about 60 MB per run (50 runs: 3.0 GB RSS and 0.4 of a CPU core, polling their
  queues) and a process start per run (a finish takes about 2.7 s with 50 of them on 2 cores). The
  acknowledgment is seen from outside: one thread per worker polls every open run's `sync.db`,
  read-only, every 50 ms, and takes a row as acknowledged at the midpoint of the two polls around the
  moment the SDK marked it COMPLETED: `flush_latency` is exact to ±25 ms. `points_retried` then only
  sees rows whose whole upload attempt failed (the SDK re-queues them with `retry_count` + 1); retries
  inside one attempt (the uploader's own up to 5 HTTP tries, 1-2-4-8 s apart) are invisible from
  outside the subprocess and show up as flush latency.
- `thread`: the same SDK upload functions (`pluto.sync.process._SyncUploader`, `_sync_batch`,
  `_flush_remaining`, with the subprocess's cadence) run in one thread per run inside the worker:
  about 2.4 MB per run (50 runs: the worker grows from 83 to 202 MB), no process starts, and each upload's
  2xx is seen as it happens: `flush_latency` is exact and `points_retried` counts every row whose
  upload took more than one HTTP attempt. It is built on the SDK's private functions
  (`simulators.mlops.pluto_sync`, checked at setup; written against pluto-ml 0.0.29) and the uploads
  share the worker's GIL with the training loops, which a real training process does not.

Each worker keeps its runs under `<run dir>/pluto-<group>-<worker>/` (the SDK's `dir` and a private
`HOME`, where the SDK saves the key in a plaintext keyring) and sets, before it imports pluto,
`PLUTO_DISABLE_TELEMETRY=1`, with `WORLD_SIZE`, `SLURM_*` and `PLUTO_RUN_ID` removed (they make
`finish` skip the drain or resume a run). It collects the host's system info once (the create
request's `systemMetadata`) instead of per run (`pluto_sync.SharedSys`); with `system_metrics` each
run also samples the worker's host every few seconds and uploads `sys/*` metrics, as real runs do
(off by default: they would measure the load generator). A heartbeat answered CANCELLED (the embedded
target's `cancel_runs`) makes the SDK call `os._exit(2)`, which would take the worker and all its runs
down: the simulator intercepts that answer, counts `runs_cancelled` and starts the user on a new run.
The SDK's per-run banner on stdout is switched off, its loggers (and httpx's) log warnings only, and
`torch`, when installed, is hidden from it in the worker: the SDK imports it only to describe CUDA and
to check for `torch.distributed` at every finish, 230 MB and seconds of CPU per worker.

    targets:
      pluto: {embedded: true, kind: pluto}       # or {url: "http://…", health: /health}: all four
    groups:                                      # pluto services behind one base URL
      training:
        simulator: mlops-sdk
        users: 50
        think_time: {type: uniform, min: 100ms, max: 500ms}
        options:
          target: pluto
          sync: process                          # or thread
          console_every: 10
    thresholds:
      - p95(training.run.log) < 500ms
      - p95(training.flush_latency) < 5s
      - count(training.points_dropped) < 1
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.durations import Duration
from harness.errors import UsageError
from harness.simulator import Simulator, User, check_weights
from simulators.mlops import pluto_sync
from simulators.mlops.curves import METRIC_KEYS, TrainingCurve
from simulators.mlops.environment import restore_env, set_env
from simulators.mlops.ingest import SEED_KEY

if importlib.util.find_spec("pluto") is None:  # `pip install 'harness[mlops]'`: say so when loaded
    raise ModuleNotFoundError("No module named 'pluto'", name="pluto")

KIND = "sdk"
TASKS = ("metrics", "batch")
_CODES = {"metrics": 1, "batch": 2}
WATCH_INTERVAL = 0.05
"""How often the `process` sync's watcher polls each open run's sync.db (flush latency to ±25 ms)."""
CHECK_INTERVAL = 0.1
"""`x_internal_check_process`: how often a run's idle SDK thread wakes, so `finish` joins it within
0.1 s instead of the default 1 s."""
REMOVED_ENV = ("WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "PLUTO_RUN_ID", "MLOP_RUN_ID", "RANK")
DEFAULT_CONFIG: dict[str, Any] = {"test_type": "load_test", "target_rps": 1000}
QUIET_LOGGERS = ("pluto", "auth", "httpx", "httpcore")


class PlutoLoopOptions(BaseModel):
    """Options of the `mlops-sdk` simulator."""

    model_config = ConfigDict(extra="forbid")
    target: str | None = None
    """A profile target (default: the only one) serving the pluto API, ingest and heartbeat routes."""
    base_url: str | None = None
    """The pluto server's URL instead of a target; the SDK's app, API, ingest and py URLs all become it."""
    api_key: str = Field(default=SEED_KEY, min_length=1)
    """The API key (use `${ENV}` for a real key); the default is the seed's CI key."""
    project: str = Field(default="load-test-project", min_length=1)
    """The project the runs go into."""
    config: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_CONFIG))
    """Each run's config, as the seed's."""
    weights: dict[str, float] = Field(default_factory=lambda: {"metrics": 5.0, "batch": 3.0})
    """Relative frequency of each step kind: `metrics` (5 curve metrics and epoch) or `batch`."""
    steps: int = Field(default=10_000, ge=1)
    """Steps per run; then the run is finished and the user starts a new one."""
    steps_per_epoch: int = Field(default=100, ge=1)
    """The `epoch` value logged with the metrics is step // steps_per_epoch."""
    console_every: int = Field(default=10, ge=0)
    """Send one console line every N steps through the run's `_log_console`; 0: none."""
    sync: Literal["process", "thread"] = "process"
    """`process`: the SDK's sync subprocess per run; `thread`: the SDK's upload code in a thread per run."""
    flush_interval: Duration = Field(default=1.0, gt=0)
    """`sync_process_flush_interval`: how often the uploader sends a batch (the SDK's 1 s)."""
    batch_size: int = Field(default=100, ge=1)
    """`sync_process_batch_size`: rows per upload at most (the SDK's 100)."""
    shutdown_timeout: Duration = Field(default=10.0, gt=2.0)
    """`sync_process_shutdown_timeout`: how long `finish` waits for the queue to drain. The SDK's final
    flush needs more than 2 s left to send anything, so 2 s or less would drop the tail of every run."""
    system_metrics: bool = False
    """Sample the worker's host every few seconds per run and upload `sys/*` metrics, as real runs do."""

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value, TASKS, "task")


@dataclass(eq=False)
class PlutoRun:
    """One training run of one user: the SDK's run object and what was logged and acknowledged."""

    name: str
    user: int
    number: int
    curve: TrainingCurve
    op: Any = None
    """The SDK's run (`pluto.op.Op`); None once finished."""
    server_id: int = 0
    db_path: str = ""
    proc: Any = None
    """The uploader: the sync subprocess's `Popen` or a `pluto_sync.ThreadSync`."""
    created: float = field(default_factory=time.time)
    step: int = 0
    tasks: bytearray = field(default_factory=bytearray)
    """Per step (index step - 1): 1 metrics, 2 batch, 0 nothing logged (the call failed)."""
    rows_logged: int = 0
    points_logged: int = 0
    rows_delivered: int = 0
    points_delivered: int = 0
    points_retried: int = 0
    console_lines: int = 0
    points_dropped: int = 0
    closing: asyncio.Future[Any] | None = None
    finished: bool = False
    abandoned: bool = False

    def logged(self) -> dict[int, tuple[str, ...]]:
        """The keys logged at each step."""
        keys = {1: (*METRIC_KEYS, "epoch"), 2: BATCH_KEYS}
        return {i + 1: keys[code] for i, code in enumerate(self.tasks) if code}


BATCH_KEYS = ("batch/loss", "batch/size")


def _quiet_banner() -> None:
    """Switch off the line pluto-ml prints to stdout for every run it creates (idempotent)."""
    from pluto.op import Op

    if not getattr(Op, "_harness_quiet", False):
        Op._print_run_banner = lambda self, verb: None
        Op._harness_quiet = True


def _timed_log(op: Any, values: dict[str, Any], step: int) -> tuple[float, BaseException | None]:
    start = time.perf_counter()
    try:
        op.log(values, step=step)
    except Exception as exc:
        return time.perf_counter() - start, exc
    return time.perf_counter() - start, None


class PlutoLoopSimulator(Simulator):
    """Training runs through the real pluto-ml SDK: run.log, flush latency, delivery and run lifecycle."""

    name = "mlops-sdk"
    description = "ML training runs through the real pluto-ml SDK: log call, flush latency, delivered points"
    Options = PlutoLoopOptions
    extra = "mlops-sdk"
    threads = 64
    """Enough for every run of a worker to create or finish at once (a finish mostly waits)."""

    @classmethod
    def summary_tables(
        cls, group: str, endpoints: list[dict[str, Any]], counters: dict[str, float]
    ) -> list[dict[str, Any]]:
        """The delivery table: points logged, delivered, dropped and retried, points/s, flush latency."""
        logged = counters.get("points_logged", 0.0)
        if not logged:
            return []
        delivered = counters.get("points_delivered", 0.0)
        by_name = {e["name"]: e for e in endpoints}
        log_calls = by_name.get("run.log") or {}
        seconds = log_calls["requests"] / log_calls["rps"] if log_calls.get("rps") else 0.0
        flush = by_name.get("flush_latency") or {}
        return [
            {
                "title": "pluto SDK delivery",
                "columns": [
                    "points logged",
                    "delivered",
                    "dropped",
                    "retried",
                    "delivered %",
                    "delivered/s",
                    "flush p50 ms",
                    "flush p95 ms",
                ],
                "rows": [
                    [
                        int(logged),
                        int(delivered),
                        int(counters.get("points_dropped", 0.0)),
                        int(counters.get("points_retried", 0.0)),
                        round(100.0 * delivered / logged, 2),
                        round(delivered / seconds, 1) if seconds else 0.0,
                        float(flush.get("p50_ms") or 0.0),
                        float(flush.get("p95_ms") or 0.0),
                    ]
                ],
                "note": "points are metric values; flush latency is per logged row, run.log call to 2xx",
            }
        ]

    async def setup(self) -> None:
        opts: PlutoLoopOptions = self.options
        self.base = (opts.base_url or self.ctx.target_url(opts.target)).rstrip("/")
        self.dir = (self.ctx.run_dir / f"pluto-{self.ctx.group}-{self.ctx.worker_index}").resolve()
        home = self.dir / "home"
        for sub in (".local/share/python_keyring", ".config"):  # made here: concurrent logins race on it
            (home / sub).mkdir(parents=True, exist_ok=True)
        # before pluto is imported: it reads HOME for its login marker at import
        self.saved_env = set_env(
            {
                "HOME": str(home),
                "XDG_DATA_HOME": str(home / ".local/share"),
                "XDG_CONFIG_HOME": str(home / ".config"),
                "PLUTO_DISABLE_TELEMETRY": "1",
            },
            REMOVED_ENV + tuple(k for k in os.environ if k.startswith("SLURM_")),
        )
        # The SDK imports torch, when installed, to describe CUDA in the host info and at every finish to
        # check for torch.distributed: 230 MB and seconds of CPU per worker that holds no model
        self.hid_torch = "torch" not in sys.modules
        if self.hid_torch:
            sys.modules["torch"] = None  # type: ignore[assignment]
        # imported by the first logins otherwise, in threads at once: the SDK's lazy import is racy
        import keyrings.alt.file
        import pluto  # noqa: F401

        # every login reads the key from the keyring file and rewrites it: have it there from the start
        keyrings.alt.file.PlaintextKeyring().set_password("pluto", "pluto", opts.api_key)

        _quiet_banner()
        pluto_sync.guard_cancel()
        # the SDK logs every request (httpx) and run start at INFO, and each run sets its logger's level
        # only after its first lines: warnings and errors only, from the start
        self.saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        self.loop = asyncio.get_running_loop()
        self.lock = threading.Lock()
        self.live: dict[str, PlutoRun] = {}
        """Open runs by sync.db path (written from the threads that create them)."""
        self.creating: set[asyncio.Future[Any]] = set()
        self.given_up = False
        """Set when teardown stops waiting: a run created after it is stopped at once."""
        self.finished_runs: deque[PlutoRun] = deque(maxlen=1000)
        """The last finished runs (without their SDK objects), for checks."""
        self.kinds = [k for k in TASKS if opts.weights.get(k, 0) > 0]
        self.cumulative: list[float] = []
        total = 0.0
        for kind in self.kinds:
            total += opts.weights[kind]
            self.cumulative.append(total)
        self.watcher: pluto_sync.DbWatcher | None = None
        if opts.sync == "thread":
            missing = pluto_sync.check_thread_sync()
            if missing:
                lacks = ", ".join(missing)
                raise UsageError(
                    f"mlops-sdk: sync: thread needs pluto-ml internals ({lacks}); use sync: process"
                )
            pluto_sync.install_thread_sync()
            pluto_sync.register_thread_dir(str(self.dir), self._sink)
        else:
            self.watcher = pluto_sync.DbWatcher(self._sink, WATCH_INTERVAL)
            self.watcher.start()
        sdk_log = logging.getLogger("pluto")
        sdk_log.setLevel(logging.ERROR)  # not "no .git folder found" from the host probe: not about a run
        try:
            self.shared_sys = await self.ctx.run_blocking(pluto_sync.SharedSys, opts.system_metrics)
        finally:
            sdk_log.setLevel(logging.WARNING)

    async def teardown(self) -> None:
        try:
            if self.creating:  # runs being created are finished like the others
                await asyncio.wait(list(self.creating))
            with self.lock:
                runs = [r for r in self.live.values() if not r.finished]
            pending = [self._closing(r) for r in runs]
            if pending:
                await asyncio.wait(pending)
        finally:
            self._abandon()
            if self.watcher is not None:
                self.watcher.stop()
            pluto_sync.unregister_thread_dir(str(self.dir))
            restore_env(self.saved_env)
            if self.hid_torch and sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
            for name, level in self.saved_levels.items():
                logging.getLogger(name).setLevel(level)

    def _abandon(self) -> None:
        """Stop the uploader of every run not finished yet and count its unacknowledged points dropped."""
        with self.lock:
            runs = [r for r in self.live.values() if not r.finished]
            self.live.clear()
            self.given_up = True
        for run in runs:
            run.abandoned = run.finished = True
            self._stop_uploader(run)
            run.points_dropped = run.points_logged - run.points_delivered
            if run.points_dropped > 0:
                self.metrics.counter("points_dropped", run.points_dropped)

    @staticmethod
    def _stop_uploader(run: PlutoRun) -> None:
        """Kill a run's sync subprocess (or stop its thread) without a finish; no finish at exit either."""
        if run.proc is not None and run.proc.poll() is None:
            with contextlib.suppress(Exception):
                run.proc.kill()
                run.proc.wait(timeout=2)
        if run.op is not None:
            atexit.unregister(run.op.finish)

    # -- users

    async def start_user(self, user: User) -> None:
        user.data = {"index": self.ctx.global_user(user), "runs": 0, "run": None}
        await self._open(user.data)

    async def stop_user(self, user: User) -> None:
        data = user.data
        if data is not None and data["run"] is not None:
            run, data["run"] = data["run"], None
            await asyncio.shield(self._closing(run))

    async def iteration(self, user: User) -> None:
        data = user.data
        assert data is not None
        opts: PlutoLoopOptions = self.options
        run: PlutoRun | None = data["run"]
        cancelled = run is not None and pluto_sync.was_cancelled(run.op)
        if run is not None and (run.step >= opts.steps or cancelled):
            if cancelled:
                self.metrics.counter("runs_cancelled")
            data["run"] = None
            await asyncio.shield(self._closing(run))
            run = None
        if run is None:
            run = await self._open(data)
            if run is None:
                return
        run.step += 1
        step = run.step
        task = self._task()
        if task == "metrics":
            values: dict[str, Any] = run.curve.metrics(step)
            values["epoch"] = run.curve.epoch(step)
        else:
            batch = run.curve.batch(step)
            values = {"batch/loss": batch["batch_loss"], "batch/size": batch["batch_size"]}
        op = run.op
        if self._log_inline(op, values):
            latency, error = _timed_log(op, values, step)
        else:
            latency, error = await self.ctx.run_blocking(_timed_log, op, values, step)
        self.metrics.request("run.log", latency, kind=KIND, ok=error is None, error=error)
        if error is not None:
            run.tasks.append(0)
        else:
            run.tasks.append(_CODES[task])
            run.rows_logged += 1
            run.points_logged += len(values)
            self.metrics.counter("points_logged", len(values))
        if opts.console_every and step % opts.console_every == 0:
            run.console_lines += 1
            size = values["batch/size"] if task == "batch" else run.curve.batch(step)["batch_size"]
            line = f"Training step {step} completed - batch_size: {size}"
            op._log_console([(line, "INFO", time.time(), run.console_lines)])
            self.metrics.counter("console_lines")

    @staticmethod
    def _log_inline(op: Any, values: dict[str, Any]) -> bool:
        """Whether to call `run.log` on the event loop: yes unless it would POST a new key's name.

        Measured with 50 runs in one worker on 2 cores, 0.1-0.5 s between steps, after the ramp: on the
        loop a call took p50 70 µs / p99 1.2 ms (thread sync) and 76 µs / 0.36 ms (process sync), a
        whole step p50 0.10-0.11 ms of loop time. Through the thread pool the call took p50 ~90 µs in
        its thread and a step twice the loop time (p50 0.21 ms), with no better event-loop lag (p99
        1.6-3.9 ms either way): the SQLite append is too short to be worth a hop. A call that registers
        a new key does a synchronous HTTP POST (seconds if the server fails: the SDK retries with
        sleeps), which must not stall the loop: that one goes to a thread.
        """
        meta = op.settings.meta
        return all(key in meta for key in values)

    def _task(self) -> str:
        pick = self.ctx.rng.random() * self.cumulative[-1]
        for kind, edge in zip(self.kinds, self.cumulative, strict=True):
            if pick < edge:
                return kind
        return self.kinds[-1]

    # -- run lifecycle

    def _settings(self) -> dict[str, Any]:
        """A fresh settings dict for one `pluto.init` (the SDK keeps and mutates what it gets)."""
        opts: PlutoLoopOptions = self.options
        return {
            # all four, or the SDK silently resets them to its hosted service
            "url_app": self.base,
            "url_api": self.base,
            "url_ingest": self.base,
            "url_py": self.base,
            "_auth": opts.api_key,
            "_sys": self.shared_sys,
            "disable_console": True,
            "insecure_disable_ssl": self.base.startswith("http://"),  # no TLS: skip building SSL contexts
            "x_log_level": logging.WARNING,
            "x_internal_check_process": CHECK_INTERVAL,
            "x_sigterm_status_enabled": False,
            "sync_process_flush_interval": float(opts.flush_interval),
            "sync_process_batch_size": opts.batch_size,
            "sync_process_shutdown_timeout": float(opts.shutdown_timeout),
        }

    async def _open(self, data: dict[str, Any]) -> PlutoRun | None:
        opts: PlutoLoopOptions = self.options
        data["runs"] += 1
        suffix = "" if data["runs"] == 1 else f"-{data['runs']}"
        run = PlutoRun(
            name=f"load-test-run-{data['index']}{suffix}",
            user=data["index"],
            number=data["runs"],
            curve=TrainingCurve(self.ctx.rng, total_steps=opts.steps, steps_per_epoch=opts.steps_per_epoch),
        )
        creating = asyncio.ensure_future(self.ctx.run_blocking(self._create, run))
        self.creating.add(creating)
        creating.add_done_callback(self.creating.discard)
        latency, error = await asyncio.shield(creating)
        self.metrics.request("run_create", latency, kind=KIND, ok=error is None, error=error)
        if error is not None:
            return None
        data["run"] = run
        return run

    def _create(self, run: PlutoRun) -> tuple[float, BaseException | str | None]:
        """`pluto.init` in a worker thread; the run is registered here, so a cancelled caller loses none."""
        import pluto

        opts: PlutoLoopOptions = self.options
        start = time.perf_counter()
        try:
            op = pluto.init(
                dir=str(self.dir),
                project=opts.project,
                name=run.name,
                config=dict(opts.config),
                settings=self._settings(),
            )
        except Exception as exc:
            return time.perf_counter() - start, exc
        latency = time.perf_counter() - start
        manager = op._sync_manager
        run.op, run.server_id, run.db_path = op, int(op.settings._op_id), manager.db_path
        run.proc = manager._process
        with self.lock:
            late = self.given_up
            if not late:
                self.live[run.db_path] = run
        if late:  # teardown gave up waiting for this creation: stop its uploader now
            self._stop_uploader(run)
            return latency, "created after the worker stopped"
        if self.watcher is not None:
            self.watcher.add(run.db_path)
        return latency, None

    def _closing(self, run: PlutoRun) -> asyncio.Future[Any]:
        """The run's finish, started once in a worker thread; recorded when done, whoever waits for it."""
        if run.closing is None:
            run.closing = asyncio.ensure_future(self.ctx.run_blocking(self._finish, run))
            run.closing.add_done_callback(lambda fut: self._finished(run, fut))
        return run.closing

    def _finish(self, run: PlutoRun) -> tuple[float, BaseException | str | None]:
        start = time.perf_counter()
        error: BaseException | str | None = None
        try:
            run.op.finish()
            status_error = getattr(run.op, "_status_update_error", None)
            if status_error is not None:
                error = f"status update not confirmed: {status_error}"
        except Exception as exc:
            error = exc
        latency = time.perf_counter() - start
        if self.watcher is not None:
            self.watcher.final(run.db_path)  # rows completed since the last poll are reported first
        if run.proc is not None and run.proc.poll() is None:  # finish always stops it; be sure
            with contextlib.suppress(Exception):
                run.proc.kill()
                run.proc.wait(timeout=5)
        return latency, error

    def _finished(self, run: PlutoRun, fut: asyncio.Future[Any]) -> None:
        """On the loop, after every acknowledgment the finish saw: record it and count what never arrived."""
        if fut.cancelled():
            return
        exc = fut.exception()
        latency, error = (0.0, exc) if exc is not None else fut.result()
        self.metrics.request("run_finish", latency, kind=KIND, ok=error is None, error=error)
        with self.lock:
            self.live.pop(run.db_path, None)
        if run.abandoned:
            return
        run.finished = True
        run.op = run.proc = None
        run.points_dropped = run.points_logged - run.points_delivered
        if run.points_dropped > 0:
            self.metrics.counter("points_dropped", run.points_dropped)
        self.finished_runs.append(run)
        self.metrics.datapoint(
            f"run-{run.server_id}",
            {
                "name": run.name,
                "steps": run.step,
                "points_logged": run.points_logged,
                "points_delivered": run.points_delivered,
                "points_dropped": run.points_dropped,
                "points_retried": run.points_retried,
                "console_lines": run.console_lines,
                "seconds": round(time.time() - run.created, 3),
            },
        )

    # -- acknowledgments (from the watcher or the sync threads)

    def _sink(self, db_path: str, acked: list[pluto_sync.Acked], retried: int) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is exiting
            self.loop.call_soon_threadsafe(self._delivered, db_path, acked, retried)

    def _delivered(self, db_path: str, acked: list[pluto_sync.Acked], retried: int) -> None:
        points = 0
        for created_at, n, acked_at in acked:
            self.metrics.phase("flush_latency", max(0.0, acked_at - created_at))
            points += n
        if points:
            self.metrics.counter("points_delivered", points)
        if retried:
            self.metrics.counter("points_retried", retried)
        run = self.live.get(db_path)
        if run is not None and not run.abandoned:
            run.rows_delivered += len(acked)
            run.points_delivered += points
            run.points_retried += retried
